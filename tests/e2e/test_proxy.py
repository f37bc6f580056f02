"""restrictpd between Postfix's pickup and delivery: rules, transparency, retries, quota.

Rules used unless a test says otherwise (harness.STANDARD_RULES):
    user www-data   allow webmaster@example.org @lists.example.org
    user root       allow *
    default         allow @localhost
    unknown         refuse
"""

import re
import signal
import time

import pytest

import harness
from harness import make_message, to_crlf

pytestmark = pytest.mark.needs_restrictpd

DELIVERY_TIMEOUT = 40      # pickup -> restrictpd -> reinjection -> sink, generous
SETTLE = 3                 # after the expected mail arrived: time for any unexpected extra


def assert_only_received_headers_before(data: bytes, submitted: bytes):
    """data == (Received: headers Postfix added) + submitted, byte for byte."""
    assert data.endswith(submitted), "the submitted message did not arrive byte for byte"
    prefix = data[: len(data) - len(submitted)]
    # the prefix must be whole header fields, each a Received: with folded continuations
    fields = re.split(rb"\r\n(?![ \t])", prefix.rstrip(b"\r\n")) if prefix else []
    assert fields, "Postfix should have added Received: headers"
    for f in fields:
        assert f.startswith(b"Received: "), f"unexpected header added before the message: {f!r}"
    assert re.search(rb"Received: by lab\.localdomain \(Postfix, from userid \d+\)\r\n\tid [0-9A-F]+; ",
                     fields[-1] + b"\r\n"), "pickup's header must sit right above the submitted text"


def settle_and_count(sink, addr: str, seconds: float = SETTLE) -> int:
    time.sleep(seconds)
    return len(sink.messages_to(addr))


# ----------------------------------------------------------------------------------------------
# 1. root: everything allowed, message arrives byte for byte


def test_root_two_recipients_arrive_byte_for_byte(postfix, sink, restrictpd_factory):
    rpd = restrictpd_factory()
    body = ("Hello Alice and Bob.\n"
            ".a line that starts with a dot\n"
            "..two dots\n"
            ".\n"
            "trailing spaces   \n"
            "\ttab-indented line\n"
            "\n"
            "From the start of a line (mbox would mangle this)\n"
            + "x" * 900 + "\n"
            "last line\n")
    msg, mid = make_message(sender="Root User <root@lab.localdomain>",
                            to=["alice@example.com", "bob@example.org"],
                            subject="e2e 1: root to two recipients", body=body)
    postfix.sendmail(["alice@example.com", "bob@example.org"], msg)

    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "bob@example.org" in m.rcpts)
    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "alice@example.com" in m.rcpts)
    postfix.wait_queue_empty(DELIVERY_TIMEOUT)
    time.sleep(1)
    delivered = [r for m in sink.messages() for r in m.rcpts]
    assert sorted(delivered) == ["alice@example.com", "bob@example.org"], "each exactly once"
    submitted = to_crlf(msg)
    for m in sink.messages():
        assert_only_received_headers_before(m.data, submitted)
        assert b"(Postfix, from userid 0)" in m.data
        assert m.mail_from == "root@lab.localdomain"

    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    line = rpd.wait_log(rf"{qid}: uid=0 user=root .*verdict=relayed")[0]
    assert "to=<alice@example.com>" in line and "<bob@example.org>" in line
    assert "from=<root@lab.localdomain>" in line


# ----------------------------------------------------------------------------------------------
# 2. www-data: allowed, refused, all or nothing


def test_www_data_allowed_recipients_arrive(postfix, sink, restrictpd_factory):
    rpd = restrictpd_factory()
    rcpts = ["webmaster@example.org", "someone@lists.example.org"]
    msg, mid = make_message(sender="www-data@lab.localdomain", to=rcpts,
                            subject="e2e 2a: www-data allowed", body="contact form\n")
    postfix.sendmail(rcpts, msg, user="www-data")
    for r in rcpts:
        sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m, r=r: r in m.rcpts)
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    rpd.wait_log(rf"{qid}: uid=33 user=www-data .*verdict=relayed")
    for m in sink.messages():
        assert b"(Postfix, from userid 33)" in m.data
        assert m.data.endswith(to_crlf(msg))


def test_www_data_refused_recipient_bounces(postfix, sink, restrictpd_factory):
    rpd = restrictpd_factory()
    msg, mid = make_message(sender="www-data@lab.localdomain", to=["carol@example.com"],
                            subject="e2e 2b: www-data to a stranger", body="spam?\n")
    postfix.sendmail(["carol@example.com"], msg, user="www-data")
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    [line] = postfix.wait_log(rf"{qid}: to=<carol@example\.com>.*dsn=5\.7\.1, status=bounced",
                              postfix.test_log_mark, DELIVERY_TIMEOUT)
    assert "550 5.7.1" in line
    rline = rpd.wait_log(rf"{qid}: uid=33 user=www-data .*verdict=refused")[0]
    assert "to=<carol@example.com>" in rline
    assert settle_and_count(sink, "carol@example.com") == 0
    assert not sink.messages_to("carol@example.com")


def test_forged_envelope_sender_cannot_turn_a_refusal_into_backscatter(postfix, sink, restrictpd_factory):
    # A refused message bounces to its envelope sender, and Postfix sends that bounce itself,
    # past restrictpd. With local_login_sender_maps (etc/postfix/main.cf.restrictpd) www-data
    # cannot name a victim as the sender: postdrop refuses the submission outright.
    restrictpd_factory()
    msg, _ = make_message(sender="victim@example.net", to=["carol@example.com"],
                          subject="e2e: backscatter attempt", body="spam carried by a bounce\n")
    out = postfix.sendmail(["carol@example.com"], msg, user="www-data", options=["-f", "victim@example.net"], check=False)
    assert out.returncode != 0, "sendmail accepted a forged envelope sender from www-data"
    assert settle_and_count(sink, "victim@example.net") == 0
    assert not sink.messages_to("carol@example.com")
    # Its own address still works, and root may still choose any sender.
    ok = postfix.sendmail(["webmaster@example.org"], msg, user="www-data", options=["-f", "www-data@lab.localdomain"])
    assert ok.returncode == 0, ok.stderr
    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "webmaster@example.org" in m.rcpts)


def test_www_data_mixed_recipients_all_or_nothing(postfix, sink, restrictpd_factory):
    rpd = restrictpd_factory()
    rcpts = ["webmaster@example.org", "carol@example.com"]
    msg, mid = make_message(sender="www-data@lab.localdomain", to=rcpts,
                            subject="e2e 2c: one allowed, one not", body="half and half\n")
    postfix.sendmail(rcpts, msg, user="www-data")
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    lines = postfix.wait_log(rf"{qid}: to=<[^>]+>.*dsn=5\.7\.1, status=bounced",
                             postfix.test_log_mark, DELIVERY_TIMEOUT, count=2)
    bounced = {re.search(r"to=<([^>]+)>", l).group(1) for l in lines}
    assert bounced == set(rcpts), "both recipients bounce: the message is refused whole"
    for l in lines:
        assert "carol@example.com" in l.split("status=bounced", 1)[1], \
            "the bounce reason names the refused recipient"
    rline = rpd.wait_log(rf"{qid}: uid=33 user=www-data .*verdict=refused")[0]
    assert "carol@example.com" in rline
    # the non-delivery notice (from <>) goes to www-data and names carol
    [dsn] = sink.wait_for(1, DELIVERY_TIMEOUT,
                          match=lambda m: m.mail_from == "" and "www-data@lab.localdomain" in m.rcpts)
    assert b"carol@example.com" in dsn.data
    time.sleep(SETTLE)
    for r in rcpts:
        assert not sink.messages_to(r), f"{r} must receive nothing (all or nothing)"


# ----------------------------------------------------------------------------------------------
# 3. a forged pickup header below the real one changes nothing


def test_forged_received_header_is_ignored(postfix, sink, restrictpd_factory):
    rpd = restrictpd_factory()
    forged = (b"Received: by x (Postfix, from userid 0)\n"
              b"\tid 0FA4ED000; Fri, 27 Nov 2026 09:13:28 +0000 (UTC)\n")
    msg, mid = make_message(sender="root@lab.localdomain", to=["carol@example.com"],
                            subject="e2e 3: forged uid 0", body="trust me, I am root\n",
                            prefix=forged)
    postfix.sendmail(["carol@example.com"], msg, user="www-data")
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    postfix.wait_log(rf"{qid}: to=<carol@example\.com>.*dsn=5\.7\.1, status=bounced",
                     postfix.test_log_mark, DELIVERY_TIMEOUT)
    rline = rpd.wait_log(rf"{qid}: uid=33 user=www-data .*verdict=refused")[0]
    assert "uid=0" not in rline
    assert settle_and_count(sink, "carol@example.com") == 0


# ----------------------------------------------------------------------------------------------
# 4. dot-stuffing, 8-bit bodies, UTF-8 addresses


def test_dot_stuffing_and_8bit_body_arrive_intact(postfix, sink, restrictpd_factory):
    rpd = restrictpd_factory()
    body = ("Grüße aus Köln – 日本語 – emoji 📬\n"
            ".\n"
            "..\n"
            ". leading dot and space\n"
            "...three\n"
            "ends with a dot .\n"
            "Ünïcödé at the end\n").encode("utf-8")
    msg, mid = make_message(sender="root@lab.localdomain", to=["dora@example.com"],
                            subject="e2e 4: dots and 8-bit", body=body,
                            extra_headers=["MIME-Version: 1.0",
                                           "Content-Type: text/plain; charset=utf-8",
                                           "Content-Transfer-Encoding: 8bit"])
    postfix.sendmail(["dora@example.com"], msg, options=["-B", "8BITMIME"])
    [m] = sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "dora@example.com" in m.rcpts)
    assert_only_received_headers_before(m.data, to_crlf(msg))
    assert "BODY=8BITMIME" in m.mail_params.upper()
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    rpd.wait_log(rf"{qid}: uid=0 user=root .*verdict=relayed")


def test_utf8_recipient_address_arrives(postfix, sink, restrictpd_factory):
    rpd = restrictpd_factory()
    rcpt = "frédéric@example.org"
    msg, mid = make_message(sender="root@lab.localdomain", to=[rcpt],
                            subject="e2e 4b: SMTPUTF8", body="Bonjour Frédéric\n".encode())
    postfix.sendmail([rcpt], msg)
    [m] = sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: rcpt in m.rcpts)
    assert "SMTPUTF8" in m.mail_params.upper()
    assert m.data.endswith(to_crlf(msg))
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    line = rpd.wait_log(rf"{qid}: uid=0 user=root .*verdict=relayed")[0]
    assert rcpt in line


# ----------------------------------------------------------------------------------------------
# 5. restrictpd down: Postfix defers; back up + flush: delivered exactly once


def test_restrictpd_down_defers_then_flush_delivers_once(postfix, sink, restrictpd_factory):
    rpd = restrictpd_factory(start=False)
    msg, mid = make_message(sender="root@lab.localdomain", to=["erin@example.com"],
                            subject="e2e 5: while restrictpd is down", body="patience\n")
    postfix.sendmail(["erin@example.com"], msg)
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    [line] = postfix.wait_log(rf"{qid}: to=<erin@example\.com>.*dsn=4\.4\.1, status=deferred",
                              postfix.test_log_mark, DELIVERY_TIMEOUT)
    assert "Connection refused" in line
    assert [q for q in postfix.queue() if q["queue_id"] == qid], "still queued"
    rpd.start()
    postfix.flush()
    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "erin@example.com" in m.rcpts)
    postfix.wait_queue_empty(DELIVERY_TIMEOUT)
    assert settle_and_count(sink, "erin@example.com") == 1, "delivered exactly once"
    assert len(rpd.grep(rf"{qid}: uid=0 user=root .*verdict=relayed")) == 1


# ----------------------------------------------------------------------------------------------
# 6. quota: N arbitrary destinations per day, persistent, race-free


def quota_rules(user: str, n: int) -> str:
    return (f"user {user}\n"
            f"    allow @localhost\n"
            f"    arbitrary {n} per day\n\n" + harness.STANDARD_RULES)


def deferred_quota_rcpts(postfix, since: int, pattern: str) -> set[str]:
    rx = re.compile(rf"to=<({pattern})>.*dsn=4\.7\.1, status=deferred")
    return {rx.search(l).group(1) for l in postfix.log_lines(since) if rx.search(l)}


def test_quota_three_per_day_survives_restart(postfix, sink, restrictpd_factory, rpdtest_user):
    rpd = restrictpd_factory(rules=quota_rules(rpdtest_user, 3))
    rcpts = [f"q{i}@example.com" for i in range(1, 6)]
    for r in rcpts:
        msg, _ = make_message(sender=f"{rpdtest_user}@lab.localdomain", to=[r],
                              subject=f"e2e 6: quota {r}", body="counted\n")
        postfix.sendmail([r], msg, user=rpdtest_user)

    def settled():
        delivered = {r for m in sink.messages() for r in m.rcpts if r in rcpts}
        deferred = deferred_quota_rcpts(postfix, postfix.test_log_mark, r"q\d@example\.com")
        return (delivered, deferred) if len(delivered) + len(deferred - delivered) >= 5 else None

    delivered, deferred = harness.wait_until(settled, 60, 0.2, "3 delivered + 2 deferred")
    time.sleep(SETTLE)
    delivered = {r for m in sink.messages() for r in m.rcpts if r in rcpts}
    assert len(delivered) == 3, f"exactly 3 may pass, got {sorted(delivered)}"
    assert len(sink.messages()) == 3
    assert deferred == set(rcpts) - delivered
    queued = postfix.queue()
    assert len(queued) == 2
    for q in queued:
        [rc] = q["recipients"]
        assert rc["address"] in deferred
        assert "4.7.1" in rc.get("delay_reason", ""), rc
    assert "4.7.1" in postfix.mailq_text()
    assert len(rpd.grep(rf"uid=\d+ user={rpdtest_user} .*verdict=deferred")) >= 2

    # restart: counts persist
    assert rpd.stop(signal.SIGTERM) == 0, "SIGTERM is a clean exit"
    rpd.start()
    mark = postfix.log_mark()
    postfix.flush()
    postfix.wait_log(r"to=<q\d@example\.com>.*dsn=4\.7\.1, status=deferred", mark,
                     DELIVERY_TIMEOUT, count=2)
    # an address already counted costs nothing
    first = sorted(delivered)[0]
    msg, _ = make_message(sender=f"{rpdtest_user}@lab.localdomain", to=[first],
                          subject="e2e 6: again to a counted address", body="free\n")
    postfix.sendmail([first], msg, user=rpdtest_user)
    sink.wait_for(4, DELIVERY_TIMEOUT)
    time.sleep(SETTLE)
    delivered_after = [r for m in sink.messages() for r in m.rcpts]
    assert sorted(set(delivered_after)) == sorted(delivered), "still the same 3 addresses"
    assert len(postfix.queue()) == 2


def test_quota_parallel_submissions_never_exceed(postfix, sink, restrictpd_factory, rpdtest_user):
    restrictpd_factory(rules=quota_rules(rpdtest_user, 10))
    rcpts = [f"p{i:02d}@example.com" for i in range(1, 31)]
    procs = []
    for r in rcpts:
        msg, _ = make_message(sender=f"{rpdtest_user}@lab.localdomain", to=[r],
                              subject=f"e2e 6: parallel {r}", body="race\n")
        procs.append(postfix.sendmail_async([r], msg, user=rpdtest_user))
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read()

    def settled():
        delivered = {r for m in sink.messages() for r in m.rcpts if r in rcpts}
        deferred = deferred_quota_rcpts(postfix, postfix.test_log_mark, r"p\d\d@example\.com")
        return (delivered, deferred) if len(delivered | deferred) >= 30 else None

    harness.wait_until(settled, 90, 0.3, "30 recipients either delivered or deferred")
    time.sleep(SETTLE)
    delivered = [r for m in sink.messages() for r in m.rcpts]
    assert len(delivered) == len(set(delivered)), "no address delivered twice"
    assert len(set(delivered)) == 10, f"exactly 10 distinct addresses, got {len(set(delivered))}"
    assert len(postfix.queue()) == 20
