"""SMTP smuggling (CVE-2023-51764) through restrictpd, with the Debian-default downstream.

restrictpd relays to a reinjection smtpd configured as Debian 12 ships Postfix 3.7, i.e.
WITHOUT smtpd_forbid_bare_newline: that listener accepts bare LF from mynetworks and reads
some non-canonical end-of-data sequences as the end of the message. restrictpd itself must stop
smuggling: it refuses any DATA with a bare CR, bare LF or NUL (550 5.6.0) and re-frames what it
relays.

The attacker here talks to restrictpd directly as root (root is in `clients`) and writes a
genuine-looking pickup header for uid 0, so the first (outer) message would be allowed by the
rules; the point is only whether a second, smuggled transaction reaches victim@example.net.

Each probe is:
    pickup header (uid 0) + headers + "body" + SEQUENCE + SMUGGLED + "QUIT\\r\\n"
with SMUGGLED = "MAIL FROM:<attacker@example.com>\\r\\nRCPT TO:<victim@example.net>\\r\\n"
                "DATA\\r\\nSubject: smuggled N\\r\\n\\r\\nsmuggled N\\r\\n.\\r\\n".
The smuggled block's own final CRLF.CRLF is the genuine end of the outer message, so a server
that does not honour SEQUENCE as end-of-data sees one message (to alice, its body containing
the smuggled text) and a server that does sees two (the second to victim).

A control run sends the same probes straight to the Debian-default listener (no restrictpd),
and to the hardened one, and records which sequences get through: it proves the test can see
smuggling when it happens. It records, it does not assert (another Postfix version may differ).
"""

from __future__ import annotations

import re
import time

import pytest

import harness

PICKUP_HEADER = (b"Received: by lab.localdomain (Postfix, from userid 0)\r\n"
                 b"\tid ABC123; Fri, 27 Nov 2026 09:13:28 +0000 (UTC)\r\n")

SEQUENCES: list[tuple[str, bytes]] = [
    (r"\n.\n", b"\n.\n"),
    (r"\n.\r\n", b"\n.\r\n"),
    (r"\r.\r", b"\r.\r"),
    (r"\r.\n", b"\r.\n"),
    (r"\n.\r", b"\n.\r"),
    (r"\r\n.\n", b"\r\n.\n"),
    (r"\r.\r\n", b"\r.\r\n"),
    (r"\r\n.\r", b"\r\n.\r"),
    (r"\r\n.\r\r\n", b"\r\n.\r\r\n"),
    (r"\r\n\x00.\r\n", b"\r\n\x00.\r\n"),
    (r"\r\n.\x00\r\n", b"\r\n.\x00\r\n"),
]

VICTIM = "victim@example.net"
SETTLE = 4


def smuggled_block(n: int | str) -> bytes:
    return (b"MAIL FROM:<attacker@example.com>\r\n"
            b"RCPT TO:<victim@example.net>\r\n"
            b"DATA\r\n"
            b"Subject: smuggled %s\r\n\r\nsmuggled %s\r\n.\r\n" % (str(n).encode(), str(n).encode()))


def outer_headers(n) -> bytes:
    return (PICKUP_HEADER +
            b"From: root@lab.localdomain\r\nTo: alice@example.com\r\n"
            b"Subject: smuggling probe %s\r\n\r\nprobe %s body" % (str(n).encode(), str(n).encode()))


def probe_payload(n: int, seq: bytes) -> bytes:
    return outer_headers(n) + seq + smuggled_block(n) + b"QUIT\r\n"


def run_session(port: int, payload: bytes, timeout: float = 10):
    """EHLO, MAIL, RCPT, DATA one at a time, then `payload` in one write.

    Returns (reply to DATA, [replies after the payload until close or timeout])."""
    with harness.SMTPClient(port, timeout=timeout) as c:
        greeting = c.reply()
        assert greeting and greeting[0] == 220, greeting
        assert c.command("EHLO attacker.example")[0] == 250
        assert c.command("MAIL FROM:<root@lab.localdomain>")[0] == 250
        assert c.command("RCPT TO:<alice@example.com>")[0] == 250
        data_reply = c.command("DATA")
        if data_reply is None or data_reply[0] != 354:
            return data_reply, []
        c.send(payload)
        return data_reply, c.replies_until_close(timeout)


def short(replies) -> str:
    return " | ".join(r[1][-1][:44] for r in replies)


def settle(postfix, sink):
    """Let Postfix deliver anything it accepted: empty queue, then a quiet moment."""
    postfix.wait_queue_empty(40)
    time.sleep(SETTLE)
    postfix.wait_queue_empty(40)


def victim_subjects(sink) -> list[str]:
    return [s for m in sink.messages_to(VICTIM) for s in m.header("Subject")]


# ----------------------------------------------------------------------------------------------


@pytest.mark.needs_restrictpd
def test_restrictpd_refuses_every_smuggling_sequence(postfix, sink, restrictpd_factory):
    rpd = restrictpd_factory(relay="debian")
    results = []
    for i, (name, seq) in enumerate(SEQUENCES, 1):
        data_reply, replies = run_session(postfix.filter_port, probe_payload(i, seq))
        assert data_reply and data_reply[0] == 354, (name, data_reply)
        results.append((name, replies))
    settle(postfix, sink)

    failures = []
    for name, replies in results:
        first = replies[0] if replies else None
        if not first or first[0] != 550 or "5.6.0" not in first[1][-1]:
            failures.append(f"{name}: end of DATA answered {first}, want 550 5.6.0 "
                            f"(all replies: {short(replies)})")
    assert not victim_subjects(sink), f"smuggled mail reached the victim: {victim_subjects(sink)}"
    leaked = [m for m in sink.messages_to("alice@example.com") if b"smuggled" in m.data]
    assert not leaked, "alice received a message carrying the smuggled text"
    assert not sink.messages(), "every probe must be refused whole"
    assert not failures, "\n".join(failures)
    refusals = rpd.grep(r"ABC123: uid=0 user=root .*verdict=refused")
    assert len(refusals) >= len(SEQUENCES), rpd.log_text()[-3000:]
    for line in refusals:
        reason = re.search(r'reason="([^"]*)"', line)
        assert reason and re.search(r"(?i)bare|nul|\bcr\b|\blf\b|5\.6\.0|line", reason.group(1)), line


@pytest.mark.needs_restrictpd
def test_restrictpd_refuses_all_sequences_in_one_message(postfix, sink, restrictpd_factory):
    """The brief's literal form: one message, every sequence followed by a smuggled
    transaction, then CRLF.CRLF and QUIT. The first genuine CRLF.CRLF restrictpd sees is the
    end of the first smuggled block: 550 5.6.0 there; what follows is read as commands (the
    next bare LF in a command line ends the session with 521)."""
    rpd = restrictpd_factory(relay="debian")
    body = outer_headers("all")
    for i, (_, seq) in enumerate(SEQUENCES, 1):
        body += seq + smuggled_block(f"all-{i}") + b"filler after probe %d" % i
    payload = body + b"\r\n.\r\nQUIT\r\n"
    data_reply, replies = run_session(postfix.filter_port, payload)
    assert data_reply[0] == 354
    assert replies and replies[0][0] == 550 and "5.6.0" in replies[0][1][-1], short(replies)
    assert not [r for r in replies if r[0] == 354], \
        f"restrictpd must never start a second DATA for the smuggled part: {short(replies)}"
    settle(postfix, sink)
    assert not victim_subjects(sink)
    assert not sink.messages()
    rpd.wait_log(r"ABC123: uid=0 user=root .*verdict=refused")


@pytest.mark.needs_restrictpd
def test_second_transaction_in_the_same_write_never_reaches_the_victim(
        postfix, sink, restrictpd_factory):
    """The brief's form: a clean message, its genuine CRLF.CRLF, and a whole second transaction
    to the victim (MAIL, RCPT, DATA *and its content*) in the same write. restrictpd must treat
    it as the next transaction, never as part of the first message. Two outcomes are safe and
    accepted:
      (a) it is judged by the rules: its message has NO pickup header, so it is unidentified
          and `unknown refuse` answers 550 5.7.1 after its end of data;
      (b) restrictpd sees message content sent before its 354 (a client that breaks RFC 2920:
          DATA must end a pipelined group) and answers 554 5.5.0 and closes, as Postfix's smtpd
          does, before relaying any of it.
    Either way the victim gets nothing and the first message arrives clean."""
    rpd = restrictpd_factory(relay="debian")
    clean = outer_headers("clean") + b"\r\nan honest line\r\n.\r\n"
    second = smuggled_block("pipelined") + b"QUIT\r\n"
    data_reply, replies = run_session(postfix.filter_port, clean + second)
    assert data_reply[0] == 354
    codes = [r[0] for r in replies]
    assert codes[:1] == [250], short(replies)
    if 354 in codes:
        after_data = replies[codes.index(354) + 1]
        assert after_data[0] == 550 and "5.7.1" in after_data[1][-1], short(replies)
        rpd.wait_log(r"to=<victim@example\.net>.*verdict=refused")
    else:
        assert codes[-1] == 554 and "5.5.0" in replies[-1][1][-1], short(replies)
    settle(postfix, sink)
    assert not sink.messages_to(VICTIM)
    [alice] = sink.messages_to("alice@example.com")
    assert b"smuggled" not in alice.data
    assert b"an honest line" in alice.data
    rpd.wait_log(r"ABC123: uid=0 user=root .*verdict=relayed")


@pytest.mark.needs_restrictpd
def test_pipelined_next_transaction_is_judged_by_the_rules(postfix, sink, restrictpd_factory):
    """RFC 2920-correct pipelining: the clean message's CRLF.CRLF followed in the same write by
    MAIL, RCPT, DATA of a second transaction; its content only after the 354. restrictpd must
    judge that second message by the rules: no pickup header -> unidentified -> `unknown
    refuse` -> 550 5.7.1, and the victim gets nothing."""
    rpd = restrictpd_factory(relay="debian")
    clean = outer_headers("clean2") + b"\r\nan honest line\r\n.\r\n"
    envelope = (b"MAIL FROM:<attacker@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n")
    with harness.SMTPClient(postfix.filter_port) as c:
        assert c.reply()[0] == 220
        assert c.command("EHLO attacker.example")[0] == 250
        assert c.command("MAIL FROM:<root@lab.localdomain>")[0] == 250
        assert c.command("RCPT TO:<alice@example.com>")[0] == 250
        assert c.command("DATA")[0] == 354
        c.send(clean + envelope)
        replies = [c.reply() for _ in range(4)]
        assert [r[0] for r in replies] == [250, 250, 250, 354], short(replies)
        c.send(b"Subject: smuggled pipelined\r\n\r\nsmuggled\r\n.\r\n")
        verdict = c.reply()
        assert verdict[0] == 550 and "5.7.1" in verdict[1][-1], verdict
        assert c.command("QUIT")[0] == 221
    settle(postfix, sink)
    assert not sink.messages_to(VICTIM)
    [alice] = sink.messages_to("alice@example.com")
    assert b"smuggled" not in alice.data
    rpd.wait_log(r"ABC123: uid=0 user=root .*verdict=relayed")
    line = rpd.wait_log(r"to=<victim@example\.net>.*verdict=refused")[0]
    assert re.search(r"NOQUEUE: |uid=-|unknown|unidentified", line), line


def test_control_direct_to_postfix_listeners(postfix, sink, record_report):
    """Control (no restrictpd): the same probes straight at the Debian-default reinjection
    listener and at the hardened one. Records which sequences smuggle; asserts only that the
    harness could talk to Postfix."""
    rows = []
    for label, port in (("debian-default", postfix.relay_port_debian),
                        ("hardened", postfix.relay_port)):
        for i, (name, seq) in enumerate(SEQUENCES, 1):
            tag = f"{label}-{i:02d}"
            data_reply, replies = run_session(port, probe_payload(tag, seq))
            rows.append((label, name, tag, data_reply, replies))
    settle(postfix, sink)

    subjects = set(victim_subjects(sink))
    alice_msgs = sink.messages_to("alice@example.com")
    table = ["SMTP smuggling control: probes sent directly to Postfix 3.7 reinjection listeners",
             f"{'listener':<15} {'sequence':<16} {'victim got mail':<16} {'alice got':<20} replies after payload"]
    smuggled_default = []
    for label, name, tag, data_reply, replies in rows:
        smuggled = f"smuggled {tag}" in subjects
        alice = [m for m in alice_msgs if f"smuggling probe {tag}\r\n".encode() in m.data]
        alice_note = ("none" if not alice else
                      "msg incl. smuggled" if any(f"smuggled {tag}\r\n".encode() in m.data for m in alice)
                      else "msg (clean)")
        if smuggled and label == "debian-default":
            smuggled_default.append(name)
        table.append(f"{label:<15} {name:<16} {'YES (smuggled)' if smuggled else 'no':<16} "
                     f"{alice_note:<20} {short(replies)}")
    table.append(f"Debian-default listener let through: {', '.join(smuggled_default) or 'nothing'}")
    text = "\n".join(table)
    print("\n" + text)
    record_report(text)
    # the harness worked: every probe got an answer to DATA
    assert all(r[3] is not None for r in rows)
