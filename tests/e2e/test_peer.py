"""Only the users in `clients` may talk to restrictpd (peer credentials of loopback TCP)."""

import shutil
import subprocess
import sys

import pytest

import harness

pytestmark = pytest.mark.needs_restrictpd

CLIENT = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.settimeout(10)
data = b""
try:
    while b"\n" not in data:
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
    s.sendall(b"EHLO nobody.example\r\n")
    while True:
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
except OSError as e:
    data += b"\n[client: %s]" % str(e).encode()
sys.stdout.write(data.decode(errors="replace"))
"""


def python_for_nobody() -> str:
    """An interpreter `nobody` may execute (pytest's own may live under /root)."""
    for candidate in ("/usr/bin/python3", shutil.which("python3") or "", sys.executable):
        if candidate and subprocess.run(["runuser", "-u", "nobody", "--", candidate, "-c", "0"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        timeout=20).returncode == 0:
            return candidate
    pytest.skip("no python3 that user nobody can execute")


def test_connection_from_user_not_in_clients_is_refused(postfix, restrictpd_factory):
    rpd = restrictpd_factory()
    mark = rpd.log_mark()
    proc = subprocess.run(["runuser", "-u", "nobody", "--", python_for_nobody(), "-c", CLIENT,
                           str(postfix.filter_port)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=30)
    out = proc.stdout.decode()
    assert out.startswith("554 5.7.1"), f"greeting for uid nobody: {out!r} {proc.stderr!r}"
    assert "250" not in out, "no command may be served after the 554 greeting"
    # the intrusion alarm: a warning naming the uid, with "refused"
    rpd.wait_log(r"uid=65534\b.*refused|refused.*uid=65534\b", mark)


def test_connection_from_root_in_clients_is_served(postfix, restrictpd_factory):
    restrictpd_factory()
    with harness.SMTPClient(postfix.filter_port) as c:
        greeting = c.reply()
        assert greeting[0] == 220
        code, lines = c.command("EHLO root.example")
        assert code == 250
        caps = {l[4:].split()[0].upper() for l in lines[1:]}
        assert caps <= {"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"}, caps
        assert not caps & {"STARTTLS", "CHUNKING", "XCLIENT", "XFORWARD", "AUTH", "ETRN", "VRFY"}
        assert c.command("QUIT")[0] == 221
