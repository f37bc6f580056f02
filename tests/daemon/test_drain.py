"""SIGTERM drain: stop accepting, let sessions in progress finish within drain_timeout, then
answer the stragglers 421 4.3.2 and exit 0."""

from __future__ import annotations

import signal
import time

import daemonlib as dl


def start(lab, drain):
    port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{port}", settings=f"drain_timeout {drain}\n")
    daemon = lab.daemon(config)
    daemon.wait_ready_log()
    daemon.wait_listening(port)
    return port, daemon


def into_data(port):
    """A session in the middle of DATA: header and part of the body sent, then a pause."""
    c = dl.Client(port)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<sender@lab.localdomain>")[0] == 250
    assert c.cmd("RCPT TO:<someone@example.org>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(dl.pickup_message(0, b"first part of the body\r\n"))
    return c


def wait_port_closed(port, timeout=3.0):
    dl.wait_until(lambda: not dl.port_accepts(port, timeout=0.5), timeout, what=f"port {port} closed")


def test_drain_lets_the_message_in_progress_finish(lab):
    port, daemon = start(lab, drain=10)
    c = into_data(port)
    time.sleep(0.5)
    t0 = time.monotonic()
    daemon.signal(signal.SIGTERM)
    daemon.wait_log(r"signal TERM: stopping; draining 1 sessions")
    wait_port_closed(port)
    # New connections are refused at the TCP level; the session in progress is still there.
    time.sleep(0.5)
    assert daemon.running, "the daemon exited with a session in progress before drain_timeout"
    c.send(b"second part of the body\r\n.\r\n")
    code, lines = c.reply(timeout=5)
    assert code == 250 and "queued as Q1" in lines[0], lines
    assert len(lab.relay.messages) == 1
    assert lab.relay.messages[0]["data"].endswith(b"first part of the body\r\nsecond part of the body\r\n")
    # A new transaction in the same session is turned away while draining.
    code, lines = c.cmd("MAIL FROM:<again@lab.localdomain>")
    assert code == 421 and "4.3.2" in lines[0], lines
    assert c.at_eof(3)
    c.close()
    assert daemon.wait_exit(5) == 0
    assert time.monotonic() - t0 < 10, "exit waited for the full drain_timeout"


def test_drain_with_quit_after_the_message(lab):
    port, daemon = start(lab, drain=10)
    c = into_data(port)
    daemon.signal(signal.SIGTERM)
    wait_port_closed(port)
    c.send(b"rest\r\n.\r\n")
    assert c.reply(timeout=5)[0] == 250
    assert c.cmd("QUIT")[0] == 221
    c.close()
    assert daemon.wait_exit(5) == 0


def test_drain_timeout_answers_stragglers_421(lab):
    port, daemon = start(lab, drain=1)
    c = into_data(port)
    t0 = time.monotonic()
    daemon.signal(signal.SIGTERM)
    code, lines = c.reply(timeout=6)   # the client stalls: it sends nothing more
    elapsed = time.monotonic() - t0
    assert code == 421 and "4.3.2" in lines[0], lines
    assert 0.8 <= elapsed <= 3.0, f"421 after {elapsed:.2f}s with drain_timeout 1"
    assert c.at_eof(3)
    c.close()
    assert daemon.wait_exit(8) == 0
    daemon.wait_log(r"drain_timeout: closing 1 sessions with 421 4\.3\.2")
    # The half-sent message must not have been delivered.
    time.sleep(0.3)
    assert lab.relay.messages == [], "a message cut off by the drain reached the relay"


def test_drain_with_idle_sessions_and_no_sessions(lab):
    # An idle session (after EHLO) at SIGTERM with drain_timeout 1: 421, exit 0.
    port, daemon = start(lab, drain=1)
    c = dl.Client(port)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    daemon.signal(signal.SIGTERM)
    code, lines = c.reply(timeout=6)
    assert code == 421 and "4.3.2" in lines[0], lines
    c.close()
    assert daemon.wait_exit(8) == 0


def test_sigint_drains_like_sigterm(lab):
    port, daemon = start(lab, drain=10)
    c = into_data(port)
    daemon.signal(signal.SIGINT)
    daemon.wait_log(r"signal INT: stopping")
    wait_port_closed(port)
    c.send(b"rest\r\n.\r\n")
    assert c.reply(timeout=5)[0] == 250
    c.close()
    assert daemon.wait_exit(5) == 0
