#!/usr/bin/env python3
"""restrictpd demo: a private Postfix with restrictpd guarding both doors.

Started by scripts/demo (which installs packages and builds restrictpd first); can be run alone:
    python3 tests/e2e/demo.py [--binary PATH] [--keep]

The two doors: mail submitted with /usr/sbin/sendmail passes pickup and restrictpd as content
filter; mail sent over SMTP to an smtpd on loopback (the stand-in for port 25, Debian's default
mynetworks, wired as etc/postfix/main.cf.restrictpd says) is judged by restrictpd as Postfix's
policy service, with the UID the kernel names as owner of the client's socket.

It sends a handful of messages as root, www-data, nobody and mail with sendmail (mail's stranger
is held in the hold queue, and the admin gets notifications), and two from
www-data over SMTP, waits until each one reached a final state, prints a table (door, sender,
recipient, verdict) built from the sink, Postfix's log and replies, and restrictpd's log, then
stops everything and removes its files (--keep leaves the instance directory for inspection).
Exit status 0 when every verdict is the expected one.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

RULES = """\
user www-data                       # the web application
    allow webmaster@example.org @lists.example.org

user root
    allow *

default                             # every other local user
    allow @localhost
    arbitrary 2 per day             # two other addresses a day; then 451 4.7.1 (Postfix retries)

user mail                           # say, a cron job that an intruder took over
    allow @localhost
    on_refuse hold                  # strangers: held in Postfix's hold queue for the admin

unknown                             # no pickup "from userid" header on top
    refuse
"""
ADMIN = "admin@example.org"         # notify: gets one mail per uid and hour


@dataclass
class Case:
    user: str
    rcpt: str
    what: str
    expect: str            # relayed | refused | deferred | held
    forged: bool = False
    door: str = "sendmail"     # sendmail (pickup, content filter) | smtp (policy service)
    message_id: str = ""
    queue_id: str = ""
    uid: str = ""
    sink: str = ""
    postfix: str = ""
    restrictpd: str = ""
    verdict: str = ""


CASES = [
    Case("root", "alice@example.com", "root may write to anyone", "relayed"),
    Case("www-data", "webmaster@example.org", "on www-data's allow list", "relayed"),
    Case("www-data", "news@lists.example.org", "allowed domain @lists.example.org", "relayed"),
    Case("www-data", "carol@example.com", "not on the allow list", "refused"),
    Case("www-data", "boss@example.com", "forged 'from userid 0' header inside the message",
         "refused", forged=True),
    Case("nobody", "friend1@example.com", "default rule: arbitrary address 1 of 2", "relayed"),
    Case("nobody", "friend2@example.com", "default rule: arbitrary address 2 of 2", "relayed"),
    Case("nobody", "friend3@example.com", "default rule: over quota (kept queued)", "deferred"),
    Case("mail", "victim@example.com", "on_refuse hold: parked in the hold queue", "held"),
    Case("www-data", "webmaster@example.org", "over SMTP to 127.0.0.1: on the allow list", "relayed",
         door="smtp"),
    Case("www-data", "dave@example.com", "over SMTP to 127.0.0.1: not on the allow list", "refused",
         door="smtp"),
]


def say(text: str = ""):
    print(text, flush=True)


def classify(case: Case, pf: harness.PostfixInstance, sink: harness.Sink,
             rpd: harness.Restrictpd, mark: int) -> bool:
    """Fill in what each source says; True once the message reached a final state."""
    if case.door == "smtp":
        return classify_smtp(case, sink, rpd)
    if not case.queue_id:
        try:
            case.queue_id = pf.queue_id_for(case.message_id, mark, timeout=0.5)
        except TimeoutError:
            return False
        m = pf.grep(rf"pickup\[\d+\]: {case.queue_id}: uid=(\d+)", mark)
        case.uid = re.search(r"uid=(\d+)", m[0]).group(1) if m else "?"
    arrived = [m for m in sink.messages_to(case.rcpt) if case.message_id.encode() in m.data]
    case.sink = "arrived" if arrived else "-"
    lines = pf.grep(rf"{case.queue_id}: to=<{re.escape(case.rcpt)}>.*status=", mark)
    if lines:
        st = re.search(r"dsn=([\d.]+), status=(\w+)", lines[-1])
        case.postfix = f"{st.group(2)} {st.group(1)}" if st else "?"
    rl = rpd.grep(rf"{case.queue_id}: uid=\S+ .*verdict=", 0)
    if rl:
        v = re.search(r"verdict=(\w+)", rl[-1]).group(1)
        q = re.search(r'quota="([^"]*)"|quota=(\S+)', rl[-1])
        case.restrictpd = v + (f" (quota {q.group(1) or q.group(2)})" if q else "")
    if case.sink == "arrived":
        case.verdict = "relayed"
    elif case.postfix.startswith("bounced"):
        case.verdict = "refused"
    elif case.postfix.startswith("deferred") and case.restrictpd.startswith("deferred"):
        case.verdict = "deferred"
    elif case.restrictpd.startswith("held") and rl and \
            (h := re.search(r"held_as=(\w+)", rl[-1])) and \
            any(q["queue_id"] == h.group(1) and q.get("queue_name") == "hold" for q in pf.queue()):
        case.verdict = "held"
    else:
        return False
    return True


def classify_smtp(case: Case, sink: harness.Sink, rpd: harness.Restrictpd) -> bool:
    """The SMTP door: smtpd's reply (case.postfix, filled in when sent), the sink, and
    restrictpd's door=smtp line for the recipient."""
    arrived = [m for m in sink.messages_to(case.rcpt) if case.message_id.encode() in m.data]
    case.sink = "arrived" if arrived else "-"
    rl = rpd.grep(rf"door=smtp .*to=<{re.escape(case.rcpt)}> verdict=", 0)
    if rl:
        case.restrictpd = re.search(r"verdict=(\w+)", rl[-1]).group(1)
        u = re.search(r"uid=(\d+)", rl[-1])
        case.uid = u.group(1) if u else "?"
    if case.sink == "arrived":
        case.verdict = "relayed"
    elif case.postfix.startswith("5") and case.restrictpd.startswith("refused"):
        case.verdict = "refused"
    else:
        return False
    return True


def send_smtp(case: Case, pf: harness.PostfixInstance, message: bytes):
    """One SMTP session as case.user to the door smtpd; smtpd's reply goes in case.postfix."""
    [session] = harness.smtp_sessions(
        pf.door_port, [harness.transaction(f"{case.user}@{harness.MYHOSTNAME}", [case.rcpt],
                                           message.decode())], user=case.user)
    rcpt = harness.reply_to(session, "RCPT")
    end = harness.reply_to(session, "<END-OF-DATA>")
    if rcpt is None:
        case.postfix = "no reply: " + "; ".join(f"{s} {c} {t}" for s, c, t in session)
    elif rcpt[0] != 250 or end is None:
        case.postfix = " ".join(rcpt[1].split()[:2]) + " at RCPT"
    else:
        case.postfix = " ".join(end[1].split()[:2]) + " queued"


def print_table(cases: list[Case]):
    head = ("#", "door", "sender (uid)", "recipient", "verdict", "expected", "sink", "postfix",
            "restrictpd log", "case")
    rows = [head]
    for i, c in enumerate(cases, 1):
        rows.append((str(i), c.door, f"{c.user} ({c.uid or '?'})", c.rcpt,
                     (c.verdict or "?") + ("" if c.verdict == c.expect else "  <-- UNEXPECTED"),
                     c.expect, c.sink or "-", c.postfix or "-", c.restrictpd or "-", c.what))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for n, r in enumerate(rows):
        say("  ".join(col.ljust(widths[i]) for i, col in enumerate(r)).rstrip())
        if n == 0:
            say("  ".join("-" * w for w in widths))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=str(harness.restrictpd_binary()))
    ap.add_argument("--keep", action="store_true", help="leave the instance directory")
    ap.add_argument("--timeout", type=float, default=90)
    args = ap.parse_args()

    problem = harness.environment_problem()
    if problem:
        say(f"demo: {problem}")
        return 2
    binary = Path(args.binary)
    if not binary.exists():
        say(f"demo: restrictpd binary {binary} not found")
        return 2

    slot = harness.Slot.acquire()
    sink = pf = rpd = None
    ok = False
    try:
        sink = harness.Sink(slot.path / "sink").start()
        pf = harness.door_postfix(slot, sink.port)
        hold_port = harness.free_port()
        pf.extra_master_cf += "\n" + harness.shipped_hold_listener(hold_port)
        pf.configure()
        say(f"demo: private Postfix in {slot.path} (config {pf.etc})")
        say(f"      sendmail: pickup -> content_filter smtp:[127.0.0.1]:{pf.filter_port} (restrictpd) "
            f"-> 127.0.0.1:{pf.relay_port} (reinjection smtpd) -> sink 127.0.0.1:{sink.port}")
        say(f"      SMTP:     smtpd 127.0.0.1:{pf.door_port} (for port 25, mynetworks = "
            f"{harness.DEBIAN_MYNETWORKS})")
        say(f"                smtpd_relay_restrictions = check_policy_service "
            f"inet:127.0.0.1:{pf.policy_port} (restrictpd), permit_mynetworks, ...")
        say(f"      held:     restrictpd -> 127.0.0.1:{hold_port} (smtpd with check_client_access "
            f"static:HOLD) -> Postfix's hold queue")
        pf.start()
        cfg = harness.restrictpd_config(port=pf.filter_port, relay_port=pf.relay_port,
                                        state=slot.path / "restrictpd" / "quota.db", rules=RULES,
                                        extra_globals=f"policy_listen 127.0.0.1:{pf.policy_port}\n"
                                                      f"hold_relay 127.0.0.1:{hold_port}\n"
                                                      f"notify {ADMIN}\n")
        rpd = harness.Restrictpd(slot.path / "restrictpd", cfg, pf.filter_port, binary)
        say(f"demo: restrictpd {binary} with this configuration:")
        say("      " + cfg.replace("\n", "\n      ").rstrip())
        rpd.start()
        mark = pf.log_mark()

        say("demo: sending mail with /usr/sbin/sendmail, and over SMTP ...")
        for i, c in enumerate(CASES, 1):
            forged = (b"Received: by x (Postfix, from userid 0)\n"
                      b"\tid 0FA4ED000; Fri, 27 Nov 2026 09:13:28 +0000 (UTC)\n") if c.forged else b""
            msg, c.message_id = harness.make_message(
                sender=f"{c.user}@{harness.MYHOSTNAME}", to=[c.rcpt],
                subject=f"demo {i}: {c.what}", body=f"Demo message {i} from {c.user}.\n",
                prefix=forged, message_id=harness.unique_id(f"demo{i}"))
            if c.door == "smtp":
                send_smtp(c, pf, msg)
                say(f"      {i}. {c.user:<8} -> {c.rcpt}  (SMTP to 127.0.0.1:{pf.door_port}: {c.postfix})")
            else:
                pf.sendmail([c.rcpt], msg, user=c.user)
                say(f"      {i}. {c.user:<8} -> {c.rcpt}")
            time.sleep(0.2)   # keep quota order readable (1 of 2, 2 of 2, over)

        say("demo: waiting for every message to reach a final state ...")
        deadline = time.monotonic() + args.timeout
        pending = list(CASES)
        while pending and time.monotonic() < deadline:
            pending = [c for c in pending if not classify(c, pf, sink, rpd, mark)]
            time.sleep(0.3)
        for c in CASES:           # one last look, so the table is as complete as it can be
            classify(c, pf, sink, rpd, mark)
        say()
        print_table(CASES)
        say()
        if pending:
            say(f"demo: {len(pending)} message(s) did not reach a final state in {args.timeout:.0f}s")
        say("restrictpd's decisions (its log, one line per message):")
        for line in rpd.grep(r"verdict=", 0):
            say("  " + line)
        say()
        say("Postfix's view (the over-quota mail deferred, retried with back-off; the held one marked !,")
        say("waiting for postsuper -H ID to release it or postsuper -d ID to delete it):")
        say("  " + pf.mailq_text().strip().replace("\n", "\n  "))
        say()
        notes = harness.wait_until(lambda: (lambda n: n if len(n) >= 2 else None)(
            [m for m in sink.messages() if ADMIN in m.rcpts]), 15, 0.3, "the admin's notifications")
        say(f"What the admin ({ADMIN}) received (notify; one mail per uid and hour, the rest later):")
        for m in notes:
            say("  ---- " + m.body.decode(errors="replace").replace("\r\n", "\n").rstrip().replace("\n", "\n  "))
        ok = not pending and all(c.verdict == c.expect for c in CASES)
        say()
        say("demo: " + ("every verdict as expected" if ok else "SOME VERDICTS WERE NOT AS EXPECTED"))
    except Exception as e:  # noqa: BLE001 - a demo reports and cleans up
        say(f"demo: failed: {e}")
        if rpd is not None:
            say("restrictpd log (tail):\n" + rpd.log_text()[-2000:])
        if pf is not None:
            say("Postfix log (tail):\n" + pf.log_text()[-2000:])
    finally:
        say("demo: stopping restrictpd, Postfix and the sink; cleaning up")
        if rpd is not None:
            rpd.stop()
        if pf is not None:
            pf.purge()
            pf.stop()
        if sink is not None:
            sink.stop()
        if args.keep:
            say(f"demo: kept {slot.path}")
        else:
            slot.release()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
