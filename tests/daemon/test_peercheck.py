"""Peer check (design decision 9): only the users in `clients` may talk to restrictpd. Everyone
else gets 554 5.7.1 at the greeting and an intrusion-alarm log line, over TCP on 127.0.0.1 and
[::1] (kernel socket table) and over a UNIX socket (SO_PEERCRED)."""

from __future__ import annotations

import os
import pwd
import stat

import pytest

import daemonlib as dl

NOBODY = pwd.getpwnam("nobody").pw_uid
POSTFIX_UID = pwd.getpwnam("postfix").pw_uid

# Connects, prints the first reply line, then CLOSED if the server hangs up within 3 s else OPEN.
# With FORGE set, pipelines a whole session with a forged "from userid 0" header first (the
# server may have closed already: a failed send is fine, the 554 is still there to read).
CLIENT = r"""
import socket, sys, time
target, forge = {target!r}, {forge!r}
if isinstance(target, str):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(5); s.connect(target)
else:
    s = socket.create_connection(tuple(target), timeout=5)
if forge:
    try:
        s.sendall(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
                  b"Received: by lab.localdomain (Postfix, from userid 0)\r\n"
                  b"\tid ABC123; Fri, 27 Nov 2026 09:13:28 +0000 (UTC)\r\n\r\nspam\r\n.\r\nQUIT\r\n")
    except OSError as e:
        print("SENDFAIL", e)
data = b""
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    try:
        chunk = s.recv(4096)
    except socket.timeout:
        break
    except ConnectionResetError:
        chunk = b""
    if not chunk:
        print("ALL", repr(data)); print(data.split(b"\r\n")[0].decode()); print("CLOSED"); sys.exit(0)
    data += chunk
    if not forge and b"\r\n" in data:
        s.settimeout(3)
print("ALL", repr(data)); print(data.split(b"\r\n")[0].decode()); print("OPEN")
"""


def connect_as(user, target, forge=False):
    r = dl.run_as(user, CLIENT.format(target=target, forge=forge), timeout=20)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    everything = next(ln for ln in lines if ln.startswith("ALL "))
    return lines[-2], lines[-1], everything  # first reply line, CLOSED|OPEN, all bytes


def start(lab, listen, clients="postfix", settings=""):
    config = lab.config(listen=listen, clients=clients, settings=settings)
    daemon = lab.daemon(config)
    daemon.wait_ready_log()
    return daemon


def check_refused(daemon, user, uid, target):
    first, state, _ = connect_as(user, target)
    assert first.startswith("554 5.7.1"), first
    assert state == "CLOSED", "the connection stayed open after 554"
    lines = daemon.wait_log(rf"uid={uid}\b.*refused")
    assert any(ln.startswith("restrictpd") and "warning" in ln for ln in lines), lines


def check_served(user, target):
    first, state, _ = connect_as(user, target)
    assert first.startswith("220 relay.test"), first
    assert state == "OPEN"


def test_tcp_v4_nobody_refused_postfix_served(lab):
    port = dl.free_port()
    daemon = start(lab, f"127.0.0.1:{port}")
    before = lab.relay.connections
    check_refused(daemon, "nobody", NOBODY, ("127.0.0.1", port))
    assert lab.relay.connections == before, "a refused peer caused a relay connection"
    check_served("postfix", ("127.0.0.1", port))
    assert lab.relay.connections == before + 1


def test_tcp_root_refused_unless_listed(lab):
    port = dl.free_port()
    daemon = start(lab, f"127.0.0.1:{port}")
    with dl.Client(port) as c:
        code, lines = c.reply()
        assert code == 554 and "5.7.1" in lines[0], lines
        assert c.at_eof(3)
    daemon.wait_log(r"uid=0 user=root refused")
    port2 = dl.free_port()
    start(lab, f"127.0.0.1:{port2}", clients="postfix root")
    with dl.Client(port2) as c:
        assert c.reply()[0] == 220


def test_forged_header_from_nobody_gets_only_554(lab):
    port = dl.free_port()
    daemon = start(lab, f"127.0.0.1:{port}")
    first, state, everything = connect_as("nobody", ("127.0.0.1", port), forge=True)
    assert first.startswith("554 5.7.1"), everything
    assert state == "CLOSED"
    # Nothing but the one 554 line was said (no 250 to EHLO, no 354, nothing relayed).
    assert everything.count("\\r\\n") == 1, everything
    assert lab.relay.connections == 0
    assert lab.relay.messages == []
    assert "verdict=" not in daemon.log()


@pytest.mark.skipif(not dl.has_ipv6_loopback(), reason="no ::1 on this machine")
def test_tcp_v6_nobody_refused_postfix_served(lab):
    port6 = dl.free_port(dl.socket.AF_INET6)
    port4 = dl.free_port()
    daemon = start(lab, [f"[::1]:{port6}", f"127.0.0.1:{port4}"])
    check_refused(daemon, "nobody", NOBODY, ("::1", port6))
    check_served("postfix", ("::1", port6))
    first, state, everything = connect_as("nobody", ("::1", port6), forge=True)
    assert first.startswith("554 5.7.1") and state == "CLOSED", everything
    assert lab.relay.messages == []
    # The v4 listener of the same daemon still serves postfix.
    check_served("postfix", ("127.0.0.1", port4))


def test_unix_socket_nobody_refused_postfix_served(lab):
    path = str(lab.dir / "smtp.sock")
    daemon = start(lab, f"unix:{path}", settings="unix_socket_mode 0666\n")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o666, oct(mode)
    check_refused(daemon, "nobody", NOBODY, path)
    check_served("postfix", path)
    first, state, everything = connect_as("nobody", path, forge=True)
    assert first.startswith("554 5.7.1") and state == "CLOSED", everything
    assert everything.count("\\r\\n") == 1, everything
    assert lab.relay.messages == []
    # A whole message from postfix over the UNIX socket is relayed.
    code = dl.run_as("postfix", f"""
import sys; sys.path.insert(0, {str(dl.HERE)!r})
import daemonlib as dl
print(dl.send_message(None, ["x@example.org"], unix={path!r})[0])
""")
    assert code.stdout.strip() == "250", code.stdout + code.stderr
    assert len(lab.relay.messages) == 1


def test_unix_socket_default_mode_0660(lab):
    path = str(lab.dir / "smtp.sock")
    start(lab, f"unix:{path}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
