"""Limits seen from outside: idle and command timeouts, over-long command lines, max_sessions."""

from __future__ import annotations

import socket
import struct
import threading
import time

import daemonlib as dl


def start(lab, settings):
    port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{port}", settings=settings)
    daemon = lab.daemon(config)
    daemon.wait_ready_log()
    return port, daemon


def test_idle_timeout(lab):
    port, daemon = start(lab, "idle_timeout 2\n")
    with dl.Client(port) as c:
        assert c.reply()[0] == 220
        t0 = time.monotonic()
        code, lines = c.reply(timeout=6)
        elapsed = time.monotonic() - t0
        assert code == 421 and "4.4.2" in lines[0], lines
        assert 1.8 <= elapsed <= 3.5, f"421 after {elapsed:.2f}s with idle_timeout 2"
        assert c.at_eof(2), "the connection stayed open after 421"
    daemon.wait_log(r"timeout: idle")


def test_command_timeout_against_a_dribbling_client(lab):
    port, daemon = start(lab, "command_timeout 2\n")
    with dl.Client(port) as c:
        assert c.reply()[0] == 220
        t0 = time.monotonic()
        got = None
        for byte in b"EHLO dribbling.client.test.with.a.long.name\r\n":
            try:
                c.send(bytes([byte]))
            except OSError:
                break
            if c.at_eof(0.5) or b"\r\n" in c.buffer:
                break
            if time.monotonic() - t0 > 6:
                break
        elapsed = time.monotonic() - t0
        got = c.buffer
        assert got.startswith(b"421 4.4.2"), got
        assert elapsed <= 3.0, f"421 only after {elapsed:.2f}s with command_timeout 2"
        assert c.at_eof(2)
    time.sleep(0.5)
    # One timeout line for the slow client, not one per byte.
    lines = [ln for ln in daemon.log().splitlines() if "timeout" in ln]
    assert len(lines) == 1, lines
    assert "command took too long" in lines[0], lines


def test_overlong_command_line_then_the_session_goes_on(lab):
    port, daemon = start(lab, "")
    with dl.Client(port) as c:
        assert c.reply()[0] == 220
        c.send(b"X" * 10240)
        time.sleep(0.2)
        c.send(b"\r\n")
        code, lines = c.reply(timeout=5)
        assert code == 500 and "5.5.2" in lines[0], lines
        code, lines = c.cmd("NOOP", timeout=5)
        assert code == 250, (lines, c.buffer)
        # Nothing else pending: exactly one reply for the long line.
        assert not c.at_eof(0.3) and c.buffer == b"", c.buffer
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<a@lab.localdomain>")[0] == 250
        assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(dl.pickup_message(0) + b".\r\n")
        assert c.reply()[0] == 250
    lines = [ln for ln in daemon.log().splitlines() if "longer than" in ln]
    assert len(lines) == 1, lines


def test_overlong_command_line_in_one_write(lab):
    port, daemon = start(lab, "")
    with dl.Client(port) as c:
        assert c.reply()[0] == 220
        c.send(b"MAIL FROM:<" + b"a" * 10240 + b"@example.org>\r\nNOOP\r\n")
        code, lines = c.reply(timeout=5)
        assert code == 500 and "5.5.2" in lines[0], lines
        assert c.reply(timeout=5)[0] == 250
        assert c.cmd("QUIT")[0] == 221


def test_max_sessions(lab):
    port, daemon = start(lab, "max_sessions 50\n")
    results = [None] * 100
    socks = [None] * 100
    barrier = threading.Barrier(100)

    def one(i):
        s = socket.socket()
        s.settimeout(10)
        socks[i] = s
        try:
            barrier.wait(timeout=10)
            s.connect(("127.0.0.1", port))
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            results[i] = data
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    try:
        assert not any(t.is_alive() for t in threads), "a connection hung"
        errors = [r for r in results if not isinstance(r, bytes)]
        assert not errors, errors[:3]
        served = [r for r in results if r.startswith(b"220 ")]
        refused = [r for r in results if r.startswith(b"421 4.3.2")]
        assert len(served) + len(refused) == 100, [r for r in results if r not in served + refused][:3]
        assert refused, "max_sessions 50 refused none of 100 concurrent sessions"
        assert len(served) <= 50, len(served)
    finally:
        for s in socks:
            if s:
                s.close()
    assert daemon.running
    # Once they are gone, a session works again.
    time.sleep(0.5)
    code, lines = dl.send_message(port, ["x@example.org"])
    assert code == 250, lines


def test_relay_unreachable_is_421_4_4_1(lab):
    port = dl.free_port()
    dead = dl.free_port()  # nothing listens there
    config = lab.config(listen=f"127.0.0.1:{port}", relay_port=dead)
    daemon = lab.daemon(config)
    daemon.wait_ready_log()
    with dl.Client(port) as c:
        code, lines = c.reply(timeout=10)
        assert code == 421 and "4.4.1" in lines[0], lines
        assert c.at_eof(2)
    assert daemon.running


def test_relay_slow_greeting_is_waited_for(lab):
    port, daemon = start(lab, "")
    lab.relay.greeting_delay = 1.0
    with dl.Client(port) as c:
        code, lines = c.reply(timeout=5)
        assert code == 220 and "relay.test" in lines[0], lines


def test_clients_that_leave_while_the_relay_greets(lab):
    """A client that closes or resets its connection while restrictpd waits for the relay's
    greeting ends that session quietly: restrictpd lives on and serves the next client."""
    port, daemon = start(lab, "relay_pool 0\n")
    lab.relay.greeting_delay = 0.3
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:
            # SO_LINGER with a zero timeout: close() sends RST at once.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            time.sleep(0.05)  # past the peer check, into the relay's greeting
        s.close()
    time.sleep(1.5)
    assert daemon.running, daemon.log()
    lab.relay.greeting_delay = 0.0
    with dl.Client(port) as c:
        assert c.reply(timeout=5)[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("QUIT")[0] == 221
    assert daemon.running, daemon.log()
    assert "Fatal error" not in daemon.log()
