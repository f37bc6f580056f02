"""The SMTP door: restrictpd as Postfix's access policy service (issue 10), end to end.

A private Postfix of its own (a slot of its own, a sink of its own) wired as
etc/postfix/main.cf.restrictpd and master.cf.restrictpd say:

- "door": an smtpd on a loopback port standing in for port 25, Debian's default mynetworks,
  smtpd_relay_restrictions = check_policy_service (restrictpd's policy_listen) before
  permit_mynetworks, the policy service again at END-OF-MESSAGE, and Cyrus SASL (sasldb)
  for the authenticated-session tests;
- pickup -> content_filter (restrictpd) -> reinjection smtpd as today; the reinjection
  listeners override both restriction lists so they never ask the policy service.

Clients run as www-data / root in processes of their own (swaks, or harness.smtp_sessions),
so the kernel names their UID as the owner of the client socket.

Rules (unless a test says otherwise):
    user www-data   allow webmaster@example.org @lists.example.org
    user root       allow *
    default         allow @localhost
    unknown         refuse

Needs root, Postfix, swaks, iproute2 (network namespace test), sasl2-bin + libsasl2-modules
(SASL test; skipped without saslpasswd2). The namespace test uses 198.51.100.0/24 (TEST-NET-2)
on a veth pair it makes and always removes; it skips if that network is in use here.
About a minute.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness

pytestmark = pytest.mark.needs_restrictpd

DELIVERY_TIMEOUT = 40
SETTLE = 3                       # after the expected mail arrived: time for any unexpected extra
WWW = "www-data"
WWW_FROM = "www-data@lab.localdomain"
ALLOWED = "webmaster@example.org"
SASL_DOMAIN = "mail.example"
SASL_USER, SASL_PASSWORD = "alice", "door-test-secret"
SASL_LOGIN = f"{SASL_USER}@{SASL_DOMAIN}"
RELAYED_DOMAIN = "relayed.example"      # relay_domains: Postfix relays it for anyone
DOOR_MAXPROC = 60                       # 50 parallel sessions must all get an smtpd



def rules(www_extra: str = "") -> str:
    return ("user www-data\n"
            "    allow webmaster@example.org @lists.example.org\n"
            f"{www_extra}"
            "\nuser root\n    allow *\n\n"
            "default\n    allow @localhost\n\n"
            "unknown\n    refuse\n")


# ----------------------------------------------------------------------------------------------
# the wiring, taken from the files restrictpd ships (harness.door_postfix uses the same)


def test_shipped_wiring_asks_restrictpd_before_permit_mynetworks():
    """What the door instance below copies: policy service first, END-OF-MESSAGE too, never on
    the reinjection smtpd."""
    door = harness.shipped_door_main_cf(12345)
    relay = [r.strip() for r in door["smtpd_relay_restrictions"].split(",")]
    assert relay[0] == "check_policy_service inet:127.0.0.1:12345", relay
    assert "permit_mynetworks" in relay[1:]
    assert door["smtpd_end_of_data_restrictions"] == "check_policy_service inet:127.0.0.1:12345"
    overrides = dict(o.split("=", 1) for o in harness.shipped_reinjection_overrides())
    assert "check_policy_service" not in overrides.get("smtpd_relay_restrictions", "x check_policy_service")
    assert overrides.get("smtpd_end_of_data_restrictions", None) == ""


# ----------------------------------------------------------------------------------------------
# fixtures: a Postfix with the SMTP door, restrictpd with policy_listen


class Door:
    """The module's Postfix instance, its sink and its ports."""

    def __init__(self, pf: harness.PostfixInstance, sink: harness.Sink):
        self.pf, self.sink = pf, sink
        self.port, self.policy_port = pf.door_port, pf.policy_port
        self.mark = 0
        self.sasl_problem: str | None = None
        self.port6: int | None = None


DOOR_OPTIONS = ["smtpd_sasl_auth_enable=yes"]


def door_master_cf(door: "Door", extra: str = "") -> str:
    six = (f"[::1]:{door.port6} inet n - n - 10 smtpd\n  -o syslog_name=postfix/door6\n"
           if door.port6 else "")
    return harness.door_master_cf(door.port, DOOR_MAXPROC, DOOR_OPTIONS, six + extra)


def setup_sasl(pf: harness.PostfixInstance):
    """Cyrus SASL with a sasldb of one mailbox user, read from $config_directory/sasl."""
    saslpasswd2 = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"
    if not Path(saslpasswd2).exists():
        return "saslpasswd2 not installed (apt-get install sasl2-bin libsasl2-modules)"
    db = pf.dir / "sasldb2"
    harness.run([saslpasswd2, "-f", str(db), "-c", "-p", "-u", SASL_DOMAIN, SASL_USER],
                input=SASL_PASSWORD.encode())
    shutil.chown(db, "postfix", "postfix")
    os.chmod(db, 0o600)
    (pf.etc / "sasl").mkdir(exist_ok=True)
    (pf.etc / "sasl" / "smtpd.conf").write_text(
        "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
        f"sasldb_path: {db}\n")
    return None


def ipv6_loopback_port() -> int | None:
    """A free TCP port on [::1], or None when this host has no IPv6 loopback."""
    import socket
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
            s6.bind(("::1", 0))
            return s6.getsockname()[1]
    except OSError:
        return None


@pytest.fixture(scope="module")
def door_instance(e2e_environment):
    slot = harness.Slot.acquire()
    sink = pf = None
    try:
        sink = harness.Sink(slot.path / "sink").start()
        port6 = ipv6_loopback_port()
        pf = harness.door_postfix(slot, sink.port, door_options=DOOR_OPTIONS, maxproc=DOOR_MAXPROC,
                                  extra_main_cf=(f"relay_domains = {RELAYED_DOMAIN}\n"
                                                 "smtpd_sasl_local_domain =\n"
                                                 # Debian's default, where there is IPv6
                                                 + ("inet_protocols = all\n" if port6 else "")))
        if port6:
            # the door on [::1] too (as Debian's smtpd listens on both loopbacks)
            pf.extra_master_cf += (f"[::1]:{port6} inet n - n - 10 smtpd\n"
                                   "  -o syslog_name=postfix/door6\n")
        pf.configure()
        sasl_problem = setup_sasl(pf)
        pf.start()
        harness.wait_until(lambda: harness.port_accepts(pf.door_port), 30, 0.1, "the door smtpd")
        door = Door(pf, sink)
        door.sasl_problem = sasl_problem
        door.port6 = port6
        yield door
    finally:
        if pf is not None:
            pf.purge()
            pf.stop()
        if sink is not None:
            sink.stop()
        slot.release()


@pytest.fixture
def door(door_instance, request):
    """The module's door instance with an empty queue and an empty sink."""
    d = door_instance
    d.pf.purge()
    d.sink.clear()
    d.mark = d.pf.log_mark()
    try:
        yield d
    finally:
        harness.clean_postfix(d.pf, d.sink, d.mark, request)


@pytest.fixture
def door_restrictpd(door, restrictpd_binary, tmp_path, request):
    """make(rules=..., extra_globals='', start=True) -> Restrictpd with policy_listen on the
    door's policy port and the content filter on the instance's filter port."""
    made: list[harness.Restrictpd] = []

    def config(rules_text: str, extra_globals: str = "") -> str:
        return harness.restrictpd_config(
            port=door.pf.filter_port, relay_port=door.pf.relay_port,
            state=tmp_path / "rpd" / "quota.db", rules=rules_text,
            extra_globals=f"policy_listen 127.0.0.1:{door.policy_port}\n{extra_globals}")

    def make(rules_text: str = rules(), extra_globals: str = "", start: bool = True):
        r = harness.Restrictpd(tmp_path / "rpd", config(rules_text, extra_globals),
                               door.pf.filter_port, restrictpd_binary)
        r.make_config = config
        made.append(r)
        if start:
            r.start()
            # its log, not a probe connection (a probe that closes at once would only earn a
            # "cannot learn the peer's uid" warning)
            r.wait_log(rf"listening on 127\.0\.0\.1:{door.policy_port} \(policy service\)", 0, 10)
        return r

    try:
        yield make
    finally:
        harness.stop_restrictpds(made, request)


# ----------------------------------------------------------------------------------------------
# helpers


def smtp_code(out: str, after: str) -> str | None:
    """The first server reply line (e.g. "550 5.7.1 ...") after the client line starting with
    `after` in a swaks transcript."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(" -> ") and line[4:].upper().startswith(after.upper()):
            for reply in lines[i + 1:]:
                m = re.match(r"^(?:<-|<\*\*)\s+(\d{3}[ ].*)$", reply)
                if m:
                    return m.group(1)
            return None
    return None


def delivered_to(sink: harness.Sink, addr: str) -> int:
    return len(sink.messages_to(addr))


def settle_count(sink: harness.Sink, seconds: float = SETTLE) -> int:
    time.sleep(seconds)
    return len(sink.messages())


# ----------------------------------------------------------------------------------------------
# 1. allowed, refused, root


def test_www_data_allowed_arrives_stranger_refused_root_arrives(door, door_restrictpd):
    rpd = door_restrictpd()
    mark = rpd.log_mark()
    postconf = lambda name: harness.run([harness.POSTCONF, "-c", str(door.pf.etc), "-h", name]).stdout.decode().strip()
    assert postconf("mynetworks") == harness.DEBIAN_MYNETWORKS
    assert postconf("smtpd_relay_restrictions").startswith(
        f"check_policy_service inet:127.0.0.1:{door.policy_port}, permit_mynetworks")

    ok = harness.swaks(port=door.port, to=ALLOWED, sender=WWW_FROM, user=WWW)
    out = ok.stdout.decode(errors="replace")
    assert ok.returncode == 0, out
    assert smtp_code(out, "RCPT TO").startswith("250"), out
    door.sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: ALLOWED in m.rcpts)
    line = rpd.wait_log(r"uid=33 user=www-data door=smtp client=127\.0\.0\.1:\d+ "
                        rf"from=<{re.escape(WWW_FROM)}> to=<{re.escape(ALLOWED)}> verdict=relayed", mark)
    assert line

    bad = harness.swaks(port=door.port, to="stranger@example.com", sender=WWW_FROM, user=WWW)
    out = bad.stdout.decode(errors="replace")
    reply = smtp_code(out, "RCPT TO")
    assert reply and reply.startswith("550 5.7.1 "), out
    assert "<stranger@example.com>: not permitted for uid 33 (www-data)" in reply, reply
    rpd.wait_log(r"NOQUEUE: uid=33 user=www-data door=smtp .*to=<stranger@example\.com> "
                 r"verdict=refused", mark)

    root = harness.swaks(port=door.port, to="anyone@example.net", sender="root@lab.localdomain")
    out = root.stdout.decode(errors="replace")
    assert root.returncode == 0, out
    door.sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "anyone@example.net" in m.rcpts)
    rpd.wait_log(r"uid=0 user=root door=smtp .*to=<anyone@example\.net> verdict=relayed", mark)

    # recipient by recipient: in one transaction the allowed one goes, the stranger does not;
    # from another loopback address (127.0.0.2) the kernel still names www-data
    [mixed] = harness.smtp_sessions(door.port, [harness.transaction(
        WWW_FROM, ["news@lists.example.org", "other@example.com"])], user=WWW, source="127.0.0.2")
    assert [c for s, c, _ in mixed if s.startswith("RCPT")] == [250, 550], mixed
    assert harness.reply_to(mixed, "<END-OF-DATA>")[0] == 250, mixed
    door.sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "news@lists.example.org" in m.rcpts)
    rpd.wait_log(r"uid=33 user=www-data door=smtp client=127\.0\.0\.2:\d+ .*to=<other@example\.com> "
                 r"verdict=refused", mark)

    assert settle_count(door.sink) == 3
    assert delivered_to(door.sink, "stranger@example.com") == 0
    assert delivered_to(door.sink, "other@example.com") == 0
    [m] = door.sink.messages_to("news@lists.example.org")
    assert m.rcpts == ["news@lists.example.org"]
    # no pickup lines: this mail never went through pickup
    assert not rpd.grep(r"door=pickup", mark)


def test_ipv6_loopback_client_is_judged_by_uid(door, door_restrictpd):
    if not door.port6:
        pytest.skip("no IPv6 loopback on this host")
    rpd = door_restrictpd(rules(www_extra="    arbitrary 1 per day\n"))
    sessions = [harness.transaction(WWW_FROM, [r]) for r in
                (ALLOWED, "v6@example.com", "v6b@example.com", "V6@Example.COM")]
    codes = []
    for steps in sessions:        # one after the other: the order decides who gets the quota
        [s] = harness.smtp_sessions(door.port6, [steps], user=WWW, host="::1")
        codes.append(harness.reply_to(s, "RCPT")[0])
    assert codes == [250, 250, 450, 250], codes      # the same address in other case is free
    rpd.wait_log(r"uid=33 user=www-data door=smtp client=\[::1\]:\d+ .*to=<v6b@example\.com> verdict=deferred")
    door.sink.wait_for(3, DELIVERY_TIMEOUT)
    assert settle_count(door.sink) == 3


# ----------------------------------------------------------------------------------------------
# 2. SASL-authenticated sessions: trust, then judge (SIGHUP)


def test_sasl_authenticated_www_data_trusted_then_judged(door, door_restrictpd):
    if door.sasl_problem:
        pytest.skip(door.sasl_problem)
    rpd = door_restrictpd()
    mark = rpd.log_mark()
    auth = (SASL_LOGIN, SASL_PASSWORD)

    # smtp_authenticated trust (the default): the mailbox user's mail, Postfix decides
    trusted = harness.swaks(port=door.port, to="friend@example.com", sender=f"{SASL_USER}@{SASL_DOMAIN}",
                            user=WWW, auth=auth)
    out = trusted.stdout.decode(errors="replace")
    assert re.search(r"<-\s+235 2\.7\.0", out), f"AUTH PLAIN against the sasldb failed:\n{out}"
    assert smtp_code(out, "RCPT TO").startswith("250"), out
    assert trusted.returncode == 0, out
    door.sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "friend@example.com" in m.rcpts)
    line = rpd.wait_log(r"door=smtp .*to=<friend@example\.com> verdict=relayed", mark)[0]
    assert "uid=33 user=www-data" in line, line
    assert f'sasl="{SASL_LOGIN}"' in line or f"sasl={SASL_LOGIN}" in line, line
    assert "smtp_authenticated trust" in line, line

    # smtp_authenticated judge: www-data's rule applies although the session is authenticated
    rpd.reload(rpd.make_config(rules(), "smtp_authenticated judge\n"))
    mark = rpd.log_mark()
    judged = harness.swaks(port=door.port, to="friend2@example.com", sender=f"{SASL_USER}@{SASL_DOMAIN}",
                           user=WWW, auth=auth)
    out = judged.stdout.decode(errors="replace")
    assert re.search(r"<-\s+235 2\.7\.0", out), out
    reply = smtp_code(out, "RCPT TO")
    assert reply and reply.startswith("550 5.7.1 "), out
    assert "not permitted for uid 33 (www-data)" in reply, reply
    line = rpd.wait_log(r"door=smtp .*to=<friend2@example\.com> verdict=refused", mark)[0]
    assert "uid=33 user=www-data" in line and SASL_LOGIN in line, line
    # an allowed address is still allowed under judge
    ok = harness.swaks(port=door.port, to=ALLOWED, sender=f"{SASL_USER}@{SASL_DOMAIN}", user=WWW, auth=auth)
    assert ok.returncode == 0, ok.stdout.decode(errors="replace")
    door.sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: ALLOWED in m.rcpts)
    assert settle_count(door.sink) == 2
    assert delivered_to(door.sink, "friend2@example.com") == 0


# ----------------------------------------------------------------------------------------------
# 3. one quota for both doors


def quota_left(rpd: harness.Restrictpd) -> str:
    return rpd.quota(WWW)


def test_quota_three_per_day_over_smtp_and_sendmail_together(door, door_restrictpd):
    rpd = door_restrictpd(rules(www_extra="    arbitrary 3 per day\n"))
    mark = rpd.log_mark()
    pf, sink = door.pf, door.sink

    def smtp(rcpt: str) -> str:
        [s] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, [rcpt])], user=WWW)
        code, text = harness.reply_to(s, "RCPT")
        return text

    def sendmail(rcpt: str) -> str:
        msg, mid = harness.make_message(sender=WWW_FROM, to=[rcpt], subject=f"quota {rcpt}",
                                        body="counted\n")
        pf.sendmail([rcpt], msg, user=WWW)
        return mid

    # 1 over SMTP, 2 with sendmail, 3 over SMTP: each waits for its delivery
    assert smtp("s1@example.com").startswith("250"), "first stranger over SMTP"
    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "s1@example.com" in m.rcpts)
    sendmail("s2@example.com")
    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "s2@example.com" in m.rcpts)
    assert smtp("s3@example.com").startswith("250")
    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "s3@example.com" in m.rcpts)

    # the fourth: over SMTP, 450 4.7.1 at RCPT (DEFER_IF_PERMIT, then permit_mynetworks)
    fourth = smtp("s4@example.com")
    assert fourth.startswith("450 4.7.1 "), fourth
    rpd.wait_log(r"NOQUEUE: uid=33 user=www-data door=smtp .*to=<s4@example\.com> verdict=deferred "
                 r'reason="<s4@example\.com> over quota" quota="0/3 per day"', mark)
    # ... and with sendmail: kept in the queue, deferred with 4.7.1
    sendmail("s5@example.com")
    pf.wait_log(r"to=<s5@example\.com>.*dsn=4\.7\.1, status=deferred", door.mark, DELIVERY_TIMEOUT)
    rpd.wait_log(r"door=pickup .*to=<s5@example\.com> verdict=deferred", mark)

    # an allowed address is not counted and still goes; a counted one costs nothing more
    assert smtp(ALLOWED).startswith("250")
    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: ALLOWED in m.rcpts)
    assert smtp("s2@example.com").startswith("250"), "s2 was counted by the sendmail door"
    sink.wait_for(2, DELIVERY_TIMEOUT, match=lambda m: "s2@example.com" in m.rcpts)

    time.sleep(SETTLE)
    strangers = sorted({r for m in sink.messages() for r in m.rcpts if r != ALLOWED})
    assert strangers == ["s1@example.com", "s2@example.com", "s3@example.com"]
    assert len(sink.messages()) == 5
    [queued] = pf.queue()
    [rc] = queued["recipients"]
    assert rc["address"] == "s5@example.com" and "4.7.1" in rc.get("delay_reason", ""), rc
    # both doors' lines: door=smtp for s1, s3 (RCPT and END-OF-MESSAGE), door=pickup for s2
    assert rpd.grep(r"door=smtp .*to=<s1@example\.com> verdict=relayed", mark)
    assert rpd.grep(r"door=pickup .*to=<s2@example\.com> verdict=relayed", mark)
    # the reinjection smtpd never asks the policy service: restrictpd (root here) relaying s2
    # would otherwise show up as a door=smtp client of uid 0
    assert not rpd.grep(r"uid=0 user=root door=smtp", mark)
    assert len(rpd.grep(r"door=smtp .*to=<s2@example\.com>", mark)) == 1   # www-data's own, over SMTP
    report = quota_left(rpd)
    for r in ("s1@example.com", "s2@example.com", "s3@example.com"):
        assert r in report, report
    assert "s4@example.com" not in report and "s5@example.com" not in report, report


@pytest.fixture
def cue_dir():
    """A directory www-data can look into (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="rpd-e2e-cue-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_quota_reserved_over_smtp_is_held_against_sendmail(door, door_restrictpd, cue_dir):
    """arbitrary 1: an SMTP transaction holds the one stranger from RCPT on; sendmail mail to
    another stranger meanwhile is deferred (4.7.1), and the SMTP mail then goes."""
    rpd = door_restrictpd(rules(www_extra="    arbitrary 1 per day\n"))
    cue = cue_dir / "go"
    result = []
    session = threading.Thread(target=lambda: result.extend(harness.smtp_sessions(
        door.port, [["EHLO hold.example", f"MAIL FROM:<{WWW_FROM}>", "RCPT TO:<h1@example.com>",
                     f"<WAIT>{cue}", "<DATA>Subject: held\n\nheld\n", "QUIT"]], user=WWW)))
    session.start()
    try:
        # the first accepted RCPT makes smtpd open a queue file: "QUEUEID: client=..."
        door.pf.wait_log(r"door/smtpd\[\d+\]: [0-9A-F]+: client=", door.mark, DELIVERY_TIMEOUT)
        msg, _ = harness.make_message(sender=WWW_FROM, to=["h2@example.com"], subject="h2", body="x\n")
        door.pf.sendmail(["h2@example.com"], msg, user=WWW)
        door.pf.wait_log(r"to=<h2@example\.com>.*dsn=4\.7\.1, status=deferred", door.mark, DELIVERY_TIMEOUT)
        rpd.wait_log(r"door=pickup .*to=<h2@example\.com> verdict=deferred")
    finally:
        cue.touch()
        session.join(60)
    [s] = result
    assert harness.reply_to(s, "RCPT")[0] == 250, s
    assert (harness.reply_to(s, "<END-OF-DATA>") or (0,))[0] == 250, s
    door.sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "h1@example.com" in m.rcpts)
    assert settle_count(door.sink) == 1
    assert "h1@example.com" in rpd.quota(WWW)


def test_over_quota_reject_is_550_at_rcpt(door, door_restrictpd):
    rpd = door_restrictpd(rules(www_extra="    arbitrary 1 per day\n    over_quota reject\n"))
    [s] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, ["t1@example.com"]),
                                            ], user=WWW)
    assert harness.reply_to(s, "RCPT")[0] == 250, s
    door.sink.wait_for(1, DELIVERY_TIMEOUT)
    [s] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, ["t2@example.com"])], user=WWW)
    code, text = harness.reply_to(s, "RCPT")
    assert code == 550 and text.startswith("550 5.7.1 <t2@example.com>:") and "quota" in text, text
    rpd.wait_log(r"door=smtp .*to=<t2@example\.com> verdict=refused reason=\"<t2@example\.com> over quota\"")
    assert settle_count(door.sink) == 1


def test_over_quota_hold_is_a_HOLD_at_rcpt(door, door_restrictpd):
    """over_quota hold at the door: the policy service answers HOLD, Postfix's own smtpd
    takes the message and parks it in the hold queue; nothing reaches the sink."""
    rpd = door_restrictpd(rules(www_extra="    arbitrary 1 per day\n    over_quota hold\n"))
    [s] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, ["t1@example.com"])], user=WWW)
    door.sink.wait_for(1, DELIVERY_TIMEOUT)
    [s] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, ["t2@example.com"])], user=WWW)
    assert harness.reply_to(s, "RCPT")[0] == 250, s
    rpd.wait_log(r"door=smtp .*to=<t2@example\.com> verdict=held reason=\"<t2@example\.com> over quota\"")
    [held] = harness.wait_until(lambda: [q for q in door.pf.queue() if q.get("queue_name") == "hold"] or None,
                                DELIVERY_TIMEOUT, 0.2, "a held message")
    assert [r["address"] for r in held["recipients"]] == ["t2@example.com"]
    assert settle_count(door.sink) == 1


def test_a_frozen_uid_is_held_at_rcpt_even_for_allowed_recipients(door, door_restrictpd):
    """freeze after 2 refusals per hour: two refused recipients over SMTP freeze www-data;
    then mail to an address on its allow list is answered HOLD and parked in the hold queue."""
    rpd = door_restrictpd(rules(), extra_globals="freeze after 2 refusals per hour\n")
    for i in (1, 2):
        [s] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, [f"dave{i}@example.com"])], user=WWW)
        assert harness.reply_to(s, "RCPT")[0] == 550, s
    rpd.wait_log(r"crit: uid 33 \(www-data\) frozen: 2 refused, over-quota or held messages")
    [s] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, ["webmaster@example.org"])], user=WWW)
    assert harness.reply_to(s, "RCPT")[0] == 250, s
    rpd.wait_log(r'door=smtp .*to=<webmaster@example\.org> verdict=held reason="uid frozen since \d+ \(2 refusals per hour\)"')
    [held] = harness.wait_until(lambda: [q for q in door.pf.queue() if q.get("queue_name") == "hold"] or None,
                                DELIVERY_TIMEOUT, 0.2, "a held message")
    assert [r["address"] for r in held["recipients"]] == ["webmaster@example.org"]
    assert settle_count(door.sink) == 0


# ----------------------------------------------------------------------------------------------
# 4. RSET or a dropped connection after RCPT spends nothing


def test_rset_or_dropped_transaction_spends_nothing(door, door_restrictpd):
    rpd = door_restrictpd(rules(www_extra="    arbitrary 3 per day\n"))
    mark = rpd.log_mark()
    sink = door.sink
    r = [f"r{i}@example.com" for i in range(1, 10)]

    # A: three strangers reserved (the whole quota), RSET, then a new transaction on the same
    # connection to three others: they must get the quota the first three had reserved
    [a] = harness.smtp_sessions(door.port, [[
        "EHLO a.example", f"MAIL FROM:<{WWW_FROM}>", *[f"RCPT TO:<{x}>" for x in r[0:3]], "RSET",
        f"MAIL FROM:<{WWW_FROM}>", f"RCPT TO:<{ALLOWED}>", "<DATA>Subject: after RSET\n\nhi\n",
        "RSET", f"MAIL FROM:<{WWW_FROM}>", *[f"RCPT TO:<{x}>" for x in r[3:6]], "RSET", "QUIT"]],
        user=WWW)
    codes = [code for step, code, _ in a if step.startswith("RCPT")]
    assert codes == [250] * 7, a
    assert harness.reply_to(a, "<END-OF-DATA>")[0] == 250, a
    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: ALLOWED in m.rcpts)

    # B: three strangers reserved, then the connection is dropped (no RSET, no QUIT)
    [b] = harness.smtp_sessions(door.port, [[
        "EHLO b.example", f"MAIL FROM:<{WWW_FROM}>", *[f"RCPT TO:<{x}>" for x in r[3:6]], "<DROP>"]],
        user=WWW)
    assert [code for step, code, _ in b if step.startswith("RCPT")] == [250] * 3, b

    report = quota_left(rpd)
    assert not any(x in report for x in r), f"nothing may be counted yet:\n{report}"

    # C: all three strangers of the quota are still there
    [c] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, r[6:9])], user=WWW)
    assert [code for step, code, _ in c if step.startswith("RCPT")] == [250] * 3, c
    assert harness.reply_to(c, "<END-OF-DATA>")[0] == 250, c
    sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: r[6] in m.rcpts)
    time.sleep(SETTLE)
    delivered = sorted(x for m in sink.messages() for x in m.rcpts)
    assert delivered == sorted([ALLOWED, *r[6:9]]), delivered
    report = quota_left(rpd)
    assert all(x in report for x in r[6:9]) and not any(x in report for x in r[0:6]), report
    # and now the quota is spent: a fourth stranger waits
    [d] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, [r[0]])], user=WWW)
    assert harness.reply_to(d, "RCPT")[0] == 450, d
    assert not rpd.grep(r"verdict=refused", mark)


# ----------------------------------------------------------------------------------------------
# 5. 50 parallel sessions against arbitrary 10


def test_fifty_parallel_sessions_reach_exactly_ten_strangers(door, door_restrictpd):
    rpd = door_restrictpd(rules(www_extra="    arbitrary 10 per day\n"))
    rcpts = [f"p{i:02d}@example.com" for i in range(50)]
    sessions = [["EHLO par.example", f"MAIL FROM:<{WWW_FROM}>", "<BARRIER>", f"RCPT TO:<{x}>",
                 f"<DATA>Subject: parallel {x}\n\nrace\n", "QUIT"] for x in rcpts]
    started = time.monotonic()
    results = harness.smtp_sessions(door.port, sessions, user=WWW, timeout=90)
    elapsed = time.monotonic() - started
    rcpt_codes = [harness.reply_to(s, "RCPT") for s in results]
    assert all(c is not None for c in rcpt_codes), [s for s in results if harness.reply_to(s, "RCPT") is None][:3]
    accepted = [x for x, (code, _) in zip(rcpts, rcpt_codes) if code == 250]
    others = [(code, text) for code, text in rcpt_codes if code != 250]
    assert len(accepted) == 10, f"{len(accepted)} RCPTs accepted; others: {others[:5]}"
    assert all(400 <= code < 500 for code, _ in others), others
    ends = [harness.reply_to(s, "<END-OF-DATA>") for s, (code, _) in zip(results, rcpt_codes) if code == 250]
    assert all(e and e[0] == 250 for e in ends), ends

    door.sink.wait_for(10, DELIVERY_TIMEOUT)
    door.pf.wait_queue_empty(DELIVERY_TIMEOUT)
    time.sleep(SETTLE)
    delivered = [x for m in door.sink.messages() for x in m.rcpts]
    assert len(delivered) == len(set(delivered)) == 10, delivered
    assert sorted(delivered) == sorted(accepted)
    assert elapsed < 60, f"50 sessions took {elapsed:.1f}s"
    assert len(rpd.grep(r"door=smtp .*verdict=deferred")) == 40


# ----------------------------------------------------------------------------------------------
# 6. restrictpd down: Postfix's default action, nothing delivered


def test_restrictpd_stopped_gives_4xx_and_nothing_is_delivered(door, door_restrictpd):
    rpd = door_restrictpd()
    # first a session while it runs, so that smtpd processes hold a policy connection
    ok = harness.swaks(port=door.port, to=ALLOWED, sender=WWW_FROM, user=WWW)
    assert ok.returncode == 0, ok.stdout.decode(errors="replace")
    door.sink.wait_for(1, DELIVERY_TIMEOUT)
    door.sink.clear()
    assert rpd.stop() == 0
    assert not harness.port_accepts(door.policy_port)

    down = harness.swaks(port=door.port, to=ALLOWED, sender=WWW_FROM, user=WWW)
    out = down.stdout.decode(errors="replace")
    reply = smtp_code(out, "RCPT TO")
    assert reply and reply.startswith("451 4.3.5"), out
    assert down.returncode != 0
    assert settle_count(door.sink) == 0
    assert door.pf.queue() == []
    door.pf.wait_log(r"door/smtpd\[\d+\]: NOQUEUE: reject: RCPT .*451 4\.3\.5", door.mark)

    # back up: Postfix's policy client connects again by itself
    rpd.start()
    rpd.wait_log(rf"listening on 127\.0\.0\.1:{door.policy_port} \(policy service\)", 0, 10)
    again = harness.swaks(port=door.port, to=ALLOWED, sender=WWW_FROM, user=WWW)
    assert again.returncode == 0, again.stdout.decode(errors="replace")
    door.sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: ALLOWED in m.rcpts)


# ----------------------------------------------------------------------------------------------
# 7. a client in a network namespace of its own is not restrictpd's to judge


def _quiet(*argv: str):
    subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


@dataclass
class NetPair:
    """A network namespace and a veth pair of this run's slot, so that concurrent runs (other
    slots) never touch each other's: TEST-NET-2 (198.51.100.0/24) cut into /30s, one a slot.
    (Not TEST-NET-1: it may be this machine's real network; here eth0 is 192.0.2.2/24 with
    192.0.2.1 as its gateway.)"""
    netns: str
    veth_host: str
    veth_ns: str
    host_addr: str
    ns_addr: str
    port: int = 0

    @classmethod
    def for_slot(cls, index: int) -> "NetPair":
        base = 4 * index
        return cls(f"rpd-e2e-door{index}", f"rpde2e{index}h", f"rpde2e{index}n",
                   f"198.51.100.{base + 1}", f"198.51.100.{base + 2}")

    def remove(self):
        _quiet("ip", "link", "del", self.veth_host)
        _quiet("ip", "netns", "del", self.netns)


@pytest.fixture
def netns_door(door):
    """start() -> NetPair: network namespace `netns` with `ns_addr`/30 on a veth pair whose
    host side has `host_addr`/30, and an smtpd of the door's kind bound to host_addr:port.
    Called by the test (so that restrictpd can be started before the address exists); always
    removed."""
    if not shutil.which("ip"):
        pytest.skip("ip(8) not installed (iproute2)")
    net = NetPair.for_slot(door.pf.slot.index)
    net.port = door.port
    started = []

    def start() -> NetPair:
        net.remove()                         # leftovers of a run in this slot that was killed
        in_use = subprocess.run(["sh", "-c", "ip -o addr; ip route; ip neigh"],
                                stdout=subprocess.PIPE, timeout=30).stdout.decode()
        for addr in (net.host_addr, net.ns_addr):
            if re.search(rf"(?<![\d.]){re.escape(addr)}(?![\d])", in_use):
                pytest.skip(f"{addr} is in use on this machine; the test would disturb it")
        started.append(True)
        for argv in (["ip", "netns", "add", net.netns],
                     ["ip", "link", "add", net.veth_host, "type", "veth", "peer", "name", net.veth_ns],
                     ["ip", "link", "set", net.veth_ns, "netns", net.netns],
                     ["ip", "addr", "add", f"{net.host_addr}/30", "dev", net.veth_host],
                     ["ip", "link", "set", net.veth_host, "up"],
                     ["ip", "netns", "exec", net.netns, "ip", "addr", "add", f"{net.ns_addr}/30",
                      "dev", net.veth_ns],
                     ["ip", "netns", "exec", net.netns, "ip", "link", "set", net.veth_ns, "up"],
                     ["ip", "netns", "exec", net.netns, "ip", "link", "set", "lo", "up"]):
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
            if proc.returncode != 0:
                pytest.skip(f"cannot set up the network namespace: {' '.join(argv)}: "
                            f"{proc.stderr.decode(errors='replace').strip()}")
        extra = (f"# the door as a client in another network namespace sees it\n"
                 f"{net.host_addr}:{net.port} inet n - n - 10 smtpd\n"
                 f"  -o syslog_name=postfix/door-veth\n")
        door.pf.write_master_cf(door_master_cf(door, extra))
        door.pf.reload()
        harness.wait_until(lambda: harness.port_accepts(net.port, net.host_addr), 30, 0.2,
                           f"an smtpd on {net.host_addr}:{net.port}")
        return net

    try:
        yield start
    finally:
        if started:
            with contextlib.suppress(Exception):
                door.pf.write_master_cf(door_master_cf(door))
                door.pf.reload()
            net.remove()
            listed = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, timeout=30)
            assert net.netns not in listed.stdout.decode().split(), \
                "the test's network namespace is still there"


def test_client_in_another_network_namespace_gets_dunno(door, door_restrictpd, netns_door):
    rpd = door_restrictpd()
    mark = rpd.log_mark()
    rcpt = f"someone@{RELAYED_DOMAIN}"
    # restrictpd runs before HOST_ADDR exists: it must learn that a new address is this host's
    net = netns_door()
    HOST_ADDR, NS_ADDR = net.host_addr, net.ns_addr

    # control: the same recipient from www-data on this host is refused by www-data's rule
    local = harness.swaks(port=door.port, to=rcpt, sender=WWW_FROM, user=WWW)
    assert smtp_code(local.stdout.decode(errors="replace"), "RCPT TO").startswith("550 5.7.1")
    rpd.wait_log(rf"door=smtp .*to=<{re.escape(rcpt)}> verdict=refused", mark)
    mark = rpd.log_mark()

    # a local client of the smtpd on HOST_ADDR (an address of this host, added after restrictpd
    # started): client_address is HOST_ADDR, still judged by uid
    host_side = harness.swaks(server=HOST_ADDR, port=net.port, to=rcpt, sender=WWW_FROM, user=WWW)
    reply = smtp_code(host_side.stdout.decode(errors="replace"), "RCPT TO")
    assert reply and reply.startswith("550 5.7.1") and "uid 33 (www-data)" in reply, \
        host_side.stdout.decode(errors="replace")
    rpd.wait_log(rf"uid=33 user=www-data door=smtp client={re.escape(HOST_ADDR)}:\d+ .*"
                 rf"to=<{re.escape(rcpt)}> verdict=refused", mark)
    mark = rpd.log_mark()

    # from the namespace (NS_ADDR, not an address of this host): DUNNO, Postfix decides,
    # and relay_domains lets it relay there
    remote = harness.swaks(server=HOST_ADDR, port=net.port, to=rcpt, sender=WWW_FROM, user=WWW,
                           netns=net.netns)
    out = remote.stdout.decode(errors="replace")
    assert smtp_code(out, "RCPT TO").startswith("250"), out
    assert remote.returncode == 0, out
    [m] = door.sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: rcpt in m.rcpts)
    assert any(NS_ADDR in v for v in m.header("Received")), m.header("Received")
    # ... and to a domain Postfix does not relay for: Postfix's own 4xx, not restrictpd's
    other = harness.swaks(server=HOST_ADDR, port=net.port, to="x@example.com", sender=WWW_FROM,
                          user=WWW, netns=net.netns)
    reply = smtp_code(other.stdout.decode(errors="replace"), "RCPT TO")
    assert reply and reply.startswith("454 4.7.1") and "Relay access denied" in reply, reply
    time.sleep(1)
    assert not rpd.grep(r"verdict=", mark), "restrictpd logs no decision for a remote client"
    door.pf.wait_log(rf"door-veth/smtpd\[\d+\]: .*client=unknown\[{re.escape(NS_ADDR)}\]|"
                     rf"door-veth/smtpd\[\d+\]: connect from .*\[{re.escape(NS_ADDR)}\]", door.mark)
    assert settle_count(door.sink) == 1


# ----------------------------------------------------------------------------------------------
# volume caps over SMTP: checked at RCPT with what open transactions hold, spent at the end


def test_volume_caps_over_smtp(door, door_restrictpd):
    rpd = door_restrictpd(rules(www_extra="    messages 2 per hour\n    max_recipients 2\n"))
    mark = rpd.log_mark()
    lists = ["a@lists.example.org", "b@lists.example.org", "c@lists.example.org"]
    # Three recipients in one message: the third is over max_recipients at RCPT.
    [s] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, lists)], user=WWW)
    rcpts = [(code, text) for step, code, text in s if step.startswith("RCPT")]
    assert [c for c, _ in rcpts] == [250, 250, 450], s
    assert rcpts[2][1].startswith("450 4.7.1 ") and "cap of 2 recipients per message reached for uid 33 (www-data)" in rcpts[2][1], rcpts
    door.sink.wait_for(1, DELIVERY_TIMEOUT)
    rpd.wait_log(r'door=smtp .*to=<a@lists\.example\.org>,<b@lists\.example\.org> verdict=relayed reason="allowed" '
                 r'messages="1/2 per hour"', mark)
    # The second message fits; the third waits with 4.7.1 naming the cap.
    [s] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, [ALLOWED])], user=WWW)
    assert harness.reply_to(s, "RCPT")[0] == 250, s
    door.sink.wait_for(2, DELIVERY_TIMEOUT)
    [s] = harness.smtp_sessions(door.port, [harness.transaction(WWW_FROM, [ALLOWED])], user=WWW)
    code, text = harness.reply_to(s, "RCPT")
    assert code == 450 and "cap of 2 messages per hour reached" in text, s
    rpd.wait_log(r'door=smtp .*verdict=deferred reason="over the messages cap \(2 messages per hour\)" '
                 r'messages="0/2 per hour"', mark)
    assert settle_count(door.sink) == 2
