"""Socket activation (design decision 10): sockets systemd passes (LISTEN_FDS, LISTEN_PID,
LISTEN_FDNAMES) win over the configuration's `listen` lines."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

import daemonlib as dl


def full_session(port):
    """EHLO, MAIL, RCPT, DATA with pickup's header, and the relay's 250."""
    with dl.Client(port) as c:
        code, lines = c.reply()
        assert code == 220 and "relay.test" in lines[0], lines
        code, lines = c.cmd("EHLO client.test")
        assert code == 250, lines
        assert not any("STARTTLS" in ln for ln in lines), lines
        assert c.cmd("MAIL FROM:<sender@lab.localdomain>")[0] == 250
        assert c.cmd("RCPT TO:<someone@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(dl.pickup_message(0, b"through the passed socket\r\n") + b".\r\n")
        code, lines = c.reply()
        assert code == 250 and "queued as Q" in lines[0], lines
        assert c.cmd("QUIT")[0] == 221


def assert_not_bound(port):
    assert not dl.port_accepts(port), f"the config's listen port {port} is bound although systemd passed a socket"
    with socket.socket() as s:  # and we can take it ourselves
        s.bind(("127.0.0.1", port))


def test_passed_socket_wins_over_listen(lab):
    passed_port = dl.free_port()
    config_port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{config_port}")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", passed_port))
    listener.listen(64)
    lab.cleanups.append(listener.close)
    fd = listener.fileno()

    def put_on_fd3():
        os.dup2(fd, 3)  # inheritable; every other fd of ours is O_CLOEXEC (PEP 446)

    daemon = lab.daemon(config, env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "smtp"},
                        shell_prefix="export LISTEN_PID=$$", preexec_fn=put_on_fd3, close_fds=False)
    # Our copy stays open: the daemon's accept() is the only one that serves.
    daemon.wait_log(r"listening on smtp \(fd 3, from systemd\)")
    daemon.wait_ready_log()
    assert_not_bound(config_port)
    full_session(passed_port)
    assert len(lab.relay.messages) == 1
    data = lab.relay.messages[0]["data"]
    assert data.startswith(b"Received: by lab.localdomain (Postfix, from userid 0)\r\n\tid ABC123;"), data
    assert b"through the passed socket" in data
    daemon.wait_log(r"verdict=relayed")


def test_listen_pid_of_another_process_is_ignored(lab):
    # LISTEN_PID names someone else: the sockets are not ours, the config's listen line is used.
    config_port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{config_port}")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    lab.cleanups.append(listener.close)
    fd = listener.fileno()
    daemon = lab.daemon(config, env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "smtp", "LISTEN_PID": "1"},
                        preexec_fn=lambda: os.dup2(fd, 3), close_fds=False)
    daemon.wait_listening(config_port)
    assert "from systemd" not in daemon.log()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="no systemd-socket-activate")
def test_systemd_socket_activate(lab):
    passed_port = dl.free_port()
    config_port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{config_port}")
    daemon = lab.daemon(config, argv_prefix=[shutil.which("systemd-socket-activate"),
                                             "-l", f"127.0.0.1:{passed_port}", "--fdname=smtp"])
    # systemd-socket-activate listens first and execs restrictpd in place (same pid).
    dl.wait_until(lambda: dl.port_accepts(passed_port), 10, what="systemd-socket-activate listening")
    daemon.wait_log(r"listening on smtp \(fd 3, from systemd\)", timeout=10)
    daemon.wait_ready_log()
    assert_not_bound(config_port)
    full_session(passed_port)
    assert len(lab.relay.messages) == 1
