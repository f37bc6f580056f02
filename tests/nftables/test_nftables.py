"""The nftables example (etc/nftables/restrictpd.nft), loaded for real in a
private network namespace: only the restrictpd user (and root) reach 10026,
only postfix reaches 10027. Needs root, unshare, runuser and nft
(apt-get install nftables); skipped otherwise."""

import os
import pathlib
import pwd
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "nftables" / "restrictpd.nft"

needs = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("nft", "unshare", "runuser", "ip")),
    reason="needs root, nft, unshare, runuser, ip")


def users():
    """Stand-ins that exist here: 'nobody' plays restrict unless it exists."""
    def have(n):
        try:
            pwd.getpwnam(n)
            return True
        except KeyError:
            return False
    restrict = "restrict" if have("restrict") else "nobody"
    postfix = "postfix" if have("postfix") else "daemon"
    other = "www-data" if have("www-data") else "bin"
    return restrict, postfix, other


def ruleset(restrict, postfix):
    text = EXAMPLE.read_text()
    text = re.sub(r'^define restrictpd_user = .*$', f'define restrictpd_user = "{restrict}"', text, flags=re.M)
    return re.sub(r'^define postfix_user = .*$', f'define postfix_user = "{postfix}"', text, flags=re.M)


@needs
def test_syntax(tmp_path):
    restrict, postfix, _ = users()
    f = tmp_path / "r.nft"
    f.write_text(ruleset(restrict, postfix))
    r = subprocess.run(["unshare", "-n", "nft", "-c", "-f", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@needs
def test_who_may_connect(tmp_path):
    restrict, postfix, other = users()
    f = tmp_path / "r.nft"
    f.write_text(ruleset(restrict, postfix))
    script = tmp_path / "run.sh"
    connect = ("import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2)")
    script.write_text(f"""set -e
ip link set lo up
nft -f {f}
/usr/bin/python3 -c '
import socket, time
ls = []
for p in (10026, 10027):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", p)); s.listen(16); ls.append(s)
time.sleep(30)' &
server=$!
for i in $(seq 50); do [ -n "$(ss -Hltn 'sport = :10027' 2>/dev/null)" ] && break; sleep 0.1; done
try() {{ if runuser -u "$1" -- /usr/bin/python3 -c "{connect}" "$2" 2>/dev/null; then echo "$1 $2 ok"; else echo "$1 $2 blocked"; fi; }}
try {restrict} 10026; try root 10026; try {other} 10026; try {postfix} 10026
try {postfix} 10027; try root 10027; try {other} 10027; try {restrict} 10027
kill $server
""")
    r = subprocess.run(["unshare", "-n", "bash", str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split("\n")[:-1] == [
        f"{restrict} 10026 ok", "root 10026 ok", f"{other} 10026 blocked", f"{postfix} 10026 blocked",
        f"{postfix} 10027 ok", "root 10027 blocked", f"{other} 10027 blocked", f"{restrict} 10027 blocked",
    ]
