"""Held mail (restrictpd.conf(5) HOLD): over_quota hold and on_refuse hold park the message
in Postfix's hold queue through the hold listener of etc/postfix/master.cf.restrictpd; it
waits there until postsuper -H releases it (delivered once, without passing restrictpd again);
a missing hold listener gives 451 4.4.1 and the message stays deferred, never sent.

The hold listener is added to the session's private Postfix for this module, on a free port,
with the lines of etc/postfix/master.cf.restrictpd.
"""

import pwd
import re
import time

import pytest

import harness
from harness import make_message

pytestmark = pytest.mark.needs_restrictpd

DELIVERY_TIMEOUT = 40
SETTLE = 3


@pytest.fixture(scope="module")
def hold_port(postfix_instance):
    previous = postfix_instance.extra_master_cf
    port = harness.free_port()
    postfix_instance.write_master_cf(previous + "\n# hold listener (tests/e2e/test_hold.py)\n"
                                     + harness.shipped_hold_listener(port))
    postfix_instance.reload()
    harness.wait_until(lambda: harness.port_accepts(port), 30, 0.2, "the hold listener")
    try:
        yield port
    finally:
        postfix_instance.write_master_cf(previous)
        postfix_instance.reload()


def rules(user: str, extra: str) -> str:
    return f"user {user}\n    allow @localhost\n{extra}\n" + harness.STANDARD_RULES


def held(postfix) -> list[dict]:
    return [q for q in postfix.queue() if q.get("queue_name") == "hold"]


def send(postfix, user: str, rcpt: str, subject: str) -> str:
    msg, mid = make_message(sender=f"{user}@lab.localdomain", to=[rcpt], subject=subject, body="suspect\n")
    postfix.sendmail([rcpt], msg, user=user)
    return mid


def test_over_quota_hold_parks_the_fourth_stranger_until_postsuper_H(postfix, sink, restrictpd_factory,
                                                                      rpdtest_user, hold_port):
    rpd = restrictpd_factory(rules=rules(rpdtest_user, "    arbitrary 3 per day\n    over_quota hold"),
                             extra_globals=f"hold_relay 127.0.0.1:{hold_port}\n")
    rcpts = [f"h{i}@example.com" for i in range(1, 5)]
    for r in rcpts[:3]:
        send(postfix, rpdtest_user, r, f"e2e hold: {r}")
    sink.wait_for(3, DELIVERY_TIMEOUT)
    mid = send(postfix, rpdtest_user, rcpts[3], "e2e hold: the fourth stranger")
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    [line] = rpd.wait_log(rf"{qid}: uid=\d+ user={rpdtest_user} .*to=<h4@example\.com> verdict=held "
                          r".*held_as=([0-9A-Za-z]+)", timeout=DELIVERY_TIMEOUT)
    held_id = re.search(r"held_as=([0-9A-Za-z]+)", line).group(1)
    assert 'quota="0/3 per day"' in line
    [entry] = harness.wait_until(lambda: held(postfix) or None, DELIVERY_TIMEOUT, 0.2, "a held message")
    assert entry["queue_id"] == held_id
    assert [r["address"] for r in entry["recipients"]] == ["h4@example.com"]
    # Postfix handed the original to restrictpd and got the hold relay's "queued as" back.
    postfix.wait_log(rf"{qid}: to=<h4@example\.com>.*status=sent \(250 2\.0\.0 Ok: queued as {held_id}\)",
                     postfix.test_log_mark, DELIVERY_TIMEOUT)
    time.sleep(SETTLE)
    assert not sink.messages_to("h4@example.com"), "held mail reached the sink"
    assert held(postfix), "still held after a queue run"
    postfix.flush()
    time.sleep(SETTLE)
    assert not sink.messages_to("h4@example.com") and held(postfix), "a flush does not release held mail"

    mark = rpd.log_mark()
    harness.run([harness.POSTSUPER, "-c", str(postfix.etc), "-H", held_id], timeout=30)
    sink.wait_for(4, DELIVERY_TIMEOUT)
    postfix.wait_queue_empty(DELIVERY_TIMEOUT)
    time.sleep(SETTLE)
    assert len(sink.messages_to("h4@example.com")) == 1, "released mail is delivered exactly once"
    assert not rpd.grep("verdict=", mark), "released mail does not pass restrictpd again"


def test_on_refuse_hold_parks_a_stranger(postfix, sink, restrictpd_factory, rpdtest_user, hold_port):
    rpd = restrictpd_factory(rules=rules(rpdtest_user, "    on_refuse hold"),
                             extra_globals=f"hold_relay 127.0.0.1:{hold_port}\n")
    mid = send(postfix, rpdtest_user, "stranger@example.com", "e2e hold: on_refuse")
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    rpd.wait_log(rf'{qid}: .*verdict=held reason="<stranger@example\.com> not on the allow list".*held_as=',
                 timeout=DELIVERY_TIMEOUT)
    [entry] = harness.wait_until(lambda: held(postfix) or None, DELIVERY_TIMEOUT, 0.2, "a held message")
    assert [r["address"] for r in entry["recipients"]] == ["stranger@example.com"]
    # An allowed recipient still goes out.
    send(postfix, rpdtest_user, "someone@localhost", "e2e hold: allowed")
    time.sleep(SETTLE)
    assert not sink.messages_to("stranger@example.com")


def test_missing_hold_listener_defers_and_sends_nothing(postfix, sink, restrictpd_factory, rpdtest_user):
    nowhere = harness.free_port()
    rpd = restrictpd_factory(rules=rules(rpdtest_user, "    on_refuse hold"),
                             extra_globals=f"hold_relay 127.0.0.1:{nowhere}\n")
    mid = send(postfix, rpdtest_user, "stranger@example.com", "e2e hold: no hold listener")
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    [line] = postfix.wait_log(rf"{qid}: to=<stranger@example\.com>.*dsn=4\.4\.1, status=deferred",
                              postfix.test_log_mark, DELIVERY_TIMEOUT)
    assert "451 4.4.1 Hold relay unavailable, message deferred" in line
    rpd.wait_log(rf"{qid}: .*verdict=deferred .*hold relay: cannot connect")
    [entry] = postfix.queue()
    assert entry["queue_id"] == qid and entry["queue_name"] == "deferred"
    postfix.flush()
    time.sleep(SETTLE)
    assert not sink.messages(), "mail meant to be held went out"
    assert [q["queue_id"] for q in postfix.queue()] == [qid]


# ----------------------------------------------------------------------------------------------
# freeze after N refusals: the UID's mail is held, allowed recipients included, until --thaw;
# the freeze is in the state database and survives SIGKILL and a restart


def stats(rpd, user: str) -> str:
    argv = [str(rpd.binary), "--stats", user, "-c", str(rpd.config)]
    return harness.run(argv, timeout=30).stdout.decode(errors="replace")


def thaw(rpd, user: str) -> str:
    argv = [str(rpd.binary), "--thaw", user, "-c", str(rpd.config)]
    return harness.run(argv, timeout=30).stdout.decode(errors="replace")


def test_freeze_after_three_refusals_holds_everything_until_thaw(postfix, sink, restrictpd_factory,
                                                                  rpdtest_user, hold_port):
    import signal
    rpd = restrictpd_factory(rules=rules(rpdtest_user, ""),
                             extra_globals=f"hold_relay 127.0.0.1:{hold_port}\n"
                                           "freeze after 3 refusals per hour\n")
    for i in range(1, 4):
        send(postfix, rpdtest_user, f"stranger{i}@example.com", f"e2e freeze: refusal {i}")
        rpd.wait_log(rf"to=<stranger{i}@example\.com> verdict=refused", timeout=DELIVERY_TIMEOUT)
    [crit] = rpd.wait_log(rf"crit: uid \d+ \({rpdtest_user}\) frozen: 3 refused, over-quota or held messages "
                          rf"\(freeze after 3 refusals per hour\); every message is held until restrictpd --thaw {rpdtest_user}")
    assert "FROZEN since" in rpd.quota(rpdtest_user)
    # --stats says so too, in --quota's words, once the refusals reached its statistics.
    harness.wait_until(lambda: "FROZEN since" in stats(rpd, rpdtest_user) or None, 30, 1, "--stats showing the freeze")
    assert (f"  FROZEN since " in stats(rpd, rpdtest_user)
            and f"its mail is held or deferred until restrictpd --thaw {rpdtest_user}" in stats(rpd, rpdtest_user))

    def allowed_is_held(n: int):
        rcpt = f"friend{n}@localhost"
        mid = send(postfix, rpdtest_user, rcpt, f"e2e freeze: allowed {n} while frozen")
        qid = postfix.queue_id_for(mid, postfix.test_log_mark)
        rpd.wait_log(rf'{qid}: .*to=<{rcpt}> verdict=held reason="uid frozen since \d+ \(3 refusals per hour\)"',
                     timeout=DELIVERY_TIMEOUT)
        harness.wait_until(lambda: [q for q in held(postfix) if q["recipients"][0]["address"] == rcpt] or None,
                           DELIVERY_TIMEOUT, 0.2, f"{rcpt} held")

    allowed_is_held(1)
    # The freeze is on disk: it survives SIGKILL and a clean restart.
    rpd.stop(signal.SIGKILL)
    rpd.start()
    allowed_is_held(2)
    assert rpd.stop(signal.SIGTERM) == 0
    rpd.start()
    allowed_is_held(3)
    time.sleep(SETTLE)
    assert not [m for m in sink.messages() if any(r.endswith("@localhost") for r in m.rcpts)]

    out = thaw(rpd, rpdtest_user)
    assert f"({rpdtest_user}): thawed" in out
    assert "FROZEN" not in rpd.quota(rpdtest_user)
    assert "FROZEN" not in stats(rpd, rpdtest_user)
    send(postfix, rpdtest_user, "friend4@localhost", "e2e freeze: after the thaw")
    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "friend4@localhost" in m.rcpts)
    rpd.wait_log(r"to=<friend4@localhost> verdict=relayed")
    assert "not frozen" in thaw(rpd, rpdtest_user)


# ----------------------------------------------------------------------------------------------
# notify: one mail per UID and interval reaches the admin, past restrictpd's own rules


def test_notify_reaches_the_admin_once_per_interval(postfix, sink, restrictpd_factory, rpdtest_user):
    admin = "admin@example.org"      # on no allow list: the notification bypasses the rules
    rpd = restrictpd_factory(rules=rules(rpdtest_user, ""),
                             extra_globals=f"notify {admin}\nnotify_interval 60\n")
    to_admin = lambda m: admin in m.rcpts  # noqa: E731
    mid = send(postfix, rpdtest_user, "stranger1@example.com", "e2e notify: first refusal")
    qid = postfix.queue_id_for(mid, postfix.test_log_mark)
    [first] = sink.wait_for(1, DELIVERY_TIMEOUT, match=to_admin)
    started = time.monotonic()
    text = first.data.decode(errors="replace")
    assert first.mail_from == "", "notifications go from <>"
    assert f"stopped mail from uid {pwd.getpwnam(rpdtest_user).pw_uid} ({rpdtest_user})" in text
    assert "1 refused" in text
    assert f"queue id {qid}" in text and "<stranger1@example.com>" in text
    for command in ("postqueue -p", "postcat -q ID", "postsuper -H ID", "postsuper -d ID",
                    f"restrictpd --thaw {rpdtest_user}", f"restrictpd --quota {rpdtest_user}"):
        assert command in text, command
    rpd.wait_log(rf"notification about uid \d+ sent to {admin}: 250 ")

    # Further refusals within the interval wait for the next mail.
    for i in (2, 3):
        send(postfix, rpdtest_user, f"stranger{i}@example.com", f"e2e notify: refusal {i}")
        rpd.wait_log(rf"to=<stranger{i}@example\.com> verdict=refused", timeout=DELIVERY_TIMEOUT)
    time.sleep(SETTLE)
    assert len([m for m in sink.messages() if to_admin(m)]) == 1, "one mail per interval"
    second = sink.wait_for(2, 60 + DELIVERY_TIMEOUT, match=to_admin)[-1]
    assert time.monotonic() - started >= 50, "the second mail waited for the interval"
    text = second.data.decode(errors="replace")
    assert "2 refused" in text and "<stranger2@example.com>" in text and "<stranger3@example.com>" in text


# ----------------------------------------------------------------------------------------------
# warn at 80%: one notice and one notification per quota window


def test_warn_at_80_percent_fires_once(postfix, sink, restrictpd_factory, rpdtest_user):
    admin = "admin@example.org"
    rpd = restrictpd_factory(rules=rules(rpdtest_user, "    arbitrary 5 per day\n    warn at 80%"),
                             extra_globals=f"notify {admin}\n")
    for i in range(1, 6):
        send(postfix, rpdtest_user, f"w{i}@example.com", f"e2e warn: {i}")
        sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m, i=i: f"w{i}@example.com" in m.rcpts)
        if i == 3:
            assert not rpd.grep(r"warn at 80%"), "3 of 5 is below 80%"
    [line] = rpd.wait_log(rf"uid \d+ \({rpdtest_user}\) has used 4 of 5 per day arbitrary recipients \(warn at 80%\)")
    [note] = sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: admin in m.rcpts)
    assert "1 warning" in note.data.decode(errors="replace")
    time.sleep(SETTLE)
    assert len(rpd.grep(r"warn at 80%")) == 1, "once per window"
    assert len([m for m in sink.messages() if admin in m.rcpts]) == 1
