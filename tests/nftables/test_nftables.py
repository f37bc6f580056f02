"""The nftables examples (etc/nftables/restrictpd.nft and restrictpd-no-policy.nft),
loaded for real in network namespaces that the tests create and delete:

- only the restrictpd user (and root) reach 10026, only postfix reaches 10027,
  over 127.0.0.1 and ::1;
- only postfix opens SMTP connections (25, 465, 587) to another host, over IPv4
  and IPv6; www-data is reset there but still reaches 443;
- the files load over themselves;
- with restrictpd-no-policy.nft, www-data is also kept from this host's SMTP ports.

The "other host" is a second namespace behind a veth pair with documentation
addresses (192.0.2.0/24, 2001:db8::/64) that exist only inside the two
namespaces: no test traffic leaves them or loopback. Every subprocess has a
timeout, and every namespace (with whatever still runs in it) is deleted at
teardown, also when a test fails.

Needs root, unshare, runuser, ip and nft (apt-get install nftables iproute2);
skipped otherwise. Users that do not exist here are played by stand-ins (see
users()); with restrict, postfix and www-data present the files load unchanged."""

import itertools
import json
import os
import pathlib
import pwd
import re
import select
import shutil
import signal
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "nftables" / "restrictpd.nft"
NO_POLICY = ROOT / "etc" / "nftables" / "restrictpd-no-policy.nft"

# Bounds for every subprocess: commands that only configure, a connection
# attempt (its connect timeout is CONNECT_TIMEOUT), and a listener's whole life.
CMD_TIMEOUT = 30

# The system python: runs as any user (a python under /root would not).
PYTHON = "/usr/bin/python3"
CONNECT_TIMEOUT = 3
SERVER_LIFETIME = 120

# The two ends of the veth pair: this host, and the remote mail server.
LOCAL4, REMOTE4 = "192.0.2.1", "192.0.2.2"
LOCAL6, REMOTE6 = "2001:db8::1", "2001:db8::2"

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


def no_policy_ruleset(postfix):
    text = NO_POLICY.read_text()
    new = f'define local_smtp_users = {{ "{postfix}", "root" }}'
    text, n = re.subn(r'^define local_smtp_users = \{ "postfix", "root" \}$', new, text, flags=re.M)
    assert n == 1, "restrictpd-no-policy.nft: local_smtp_users is not the shipped default"
    return text


def with_root_out(text):
    """restrictpd.nft with its commented-out choice taken: root may send SMTP out too."""
    text, n = re.subn(r'^define smtp_out_users = .*\n((?:#.*\n)*)#(define smtp_out_users = .*"root".*)$',
                      r"\1\2", text, flags=re.M)
    assert n == 1, "the commented-out smtp_out_users with root is missing"
    return text


def run(*argv, timeout=CMD_TIMEOUT):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{argv}: {r.stdout}{r.stderr}"
    return r.stdout


# --- namespaces ---------------------------------------------------------------

_serial = itertools.count()


def _kill_all_in(ns):
    """SIGKILL every process still in namespace ns (only the tests' own processes run there)."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=CMD_TIMEOUT)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def netns():
    """A factory for empty network namespaces with lo up; all of them, and
    whatever runs in them, are gone after the test."""
    made = []

    def make():
        name = f"rpdtest-{os.getpid()}-{next(_serial)}"
        run("ip", "netns", "add", name)
        made.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for ns in made:
            _kill_all_in(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=CMD_TIMEOUT)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                timeout=CMD_TIMEOUT).stdout
        left = [ns for ns in made if re.search(rf"^{re.escape(ns)}\b", listed, flags=re.M)]
        assert not left, f"namespaces left behind: {left}"


def link(a, b):
    """A veth pair between namespaces a (this host) and b (the remote server),
    with the documentation addresses. The ends are created inside the
    namespaces, so nothing appears in the host's own namespace."""
    run("ip", "link", "add", "rpd0", "netns", a, "type", "veth", "peer", "name", "rpd0", "netns", b)
    for ns, v4, v6 in ((a, LOCAL4, LOCAL6), (b, REMOTE4, REMOTE6)):
        run("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", "rpd0")
        # nodad: the address is usable at once, not after duplicate detection.
        run("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", "rpd0", "nodad")
        run("ip", "-n", ns, "link", "set", "rpd0", "up")


def load(ns, path):
    run("ip", "netns", "exec", ns, "nft", "-f", str(path))


# A listener: binds every ADDR PORT it is given, says "ready", then accepts
# and closes connections, writing "ADDR PORT" for each, until SIGTERM or its
# lifetime ends.
SERVER = r"""
import select, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
socks = []
for spec in sys.argv[2:]:
    addr, port = spec.rsplit(" ", 1)
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ":" in addr:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, int(port)))
    s.listen(64)
    socks.append((s, spec))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    ready = select.select([s for s, _ in socks], [], [], 0.5)[0]
    for s, spec in socks:
        if s in ready:
            c, _ = s.accept()
            c.close()
            print(spec, flush=True)
"""

# A connection attempt as some user: prints ok, refused (a TCP reset) or the error.
CLIENT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("ok")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print(type(e).__name__)
"""


class Server:
    def __init__(self, ns, endpoints):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PYTHON, "-c", SERVER, str(SERVER_LIFETIME)]
            + [f"{a} {p}" for a, p in endpoints],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], CMD_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if line != "ready\n":
            self.stop()
            raise AssertionError(f"listener did not start: {line!r} {self.proc.stderr.read()}")

    def stop(self):
        """Ends the listener; returns the "ADDR PORT" of every connection it accepted."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=CMD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=CMD_TIMEOUT)
        return [l for l in out.splitlines() if l != "ready"]


@pytest.fixture
def servers():
    """Listeners started in a test are stopped at its end (the namespace
    teardown would kill them too; this also reaps them)."""
    started = []

    def start(ns, endpoints):
        s = Server(ns, endpoints)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            s.stop()


def attempt(ns, user, addr, port):
    """Connects as user from namespace ns: "ok", "refused" (reset) or an error name."""
    r = subprocess.run(["ip", "netns", "exec", ns, "runuser", "-u", user, "--",
                        PYTHON, "-c", CLIENT, addr, str(port), str(CONNECT_TIMEOUT)],
                       capture_output=True, text=True, timeout=CMD_TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def outcomes(ns, cases):
    """{(user, addr, port): outcome} for every (user, addr, port) in cases."""
    return {c: attempt(ns, *c) for c in cases}


def accepted(cases, results):
    """The "ADDR PORT" lines a listener should have printed: one per "ok"."""
    return sorted(f"{a} {p}" for (u, a, p) in cases if results[(u, a, p)] == "ok")


# --- tests --------------------------------------------------------------------

@needs
def test_syntax(tmp_path):
    restrict, postfix, _ = users()
    f = tmp_path / "r.nft"
    f.write_text(ruleset(restrict, postfix))
    g = tmp_path / "n.nft"
    g.write_text(no_policy_ruleset(postfix))
    h = tmp_path / "root.nft"
    h.write_text(with_root_out(ruleset(restrict, postfix)))
    for path in (f, g, h):
        r = subprocess.run(["unshare", "-n", "nft", "-c", "-f", str(path)],
                           capture_output=True, text=True, timeout=CMD_TIMEOUT)
        assert r.returncode == 0, r.stderr


@needs
def test_loads_over_itself(tmp_path):
    """Both files load twice in a row (and in either order) in a fresh
    namespace; the result is the same tables, once each."""
    restrict, postfix, _ = users()
    f = tmp_path / "r.nft"
    f.write_text(ruleset(restrict, postfix))
    g = tmp_path / "n.nft"
    g.write_text(no_policy_ruleset(postfix))
    script = f"""set -e
nft -f {f}
first=$(nft list ruleset)
nft -f {f}
[ "$first" = "$(nft list ruleset)" ] || {{ echo "second load changed the ruleset"; exit 1; }}
nft -f {g}
nft -f {g}
nft -f {f}
nft list tables
"""
    r = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True,
                       timeout=CMD_TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.splitlines()) == ["table inet restrictpd", "table inet restrictpd_no_policy"]


AUDIT_FIXTURES = ROOT / "Tests" / "RestrictDaemonTests" / "AuditFirewallFixtures.swift"


def audit_fixture(name):
    """One `nft -j list ruleset` fixture of restrictpd --audit's firewall tests."""
    m = re.search(rf'static let {name} = #"""\n(.*?)\n"""#', AUDIT_FIXTURES.read_text(), flags=re.S)
    assert m, f"{name} missing from {AUDIT_FIXTURES}"
    return m.group(1)


def comparable(ruleset_json):
    """A ruleset without what differs from one load or machine to the next: metainfo, the
    handles, and the uids the user names resolved to."""
    def strip(v):
        if isinstance(v, dict):
            if v.get("left") == {"meta": {"key": "skuid"}}:
                return {**v, "right": "UID"}
            return {k: strip(x) for k, x in v.items() if k != "handle"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    items = json.loads(ruleset_json)["nftables"]
    return [strip(i) for i in items if "metainfo" not in i]


@needs
@pytest.mark.parametrize("name,text", [("shipped", lambda: ruleset(*users()[:2])),
                                       ("noPolicyAlone", lambda: no_policy_ruleset(users()[1]))],
                         ids=["restrictpd.nft", "restrictpd-no-policy.nft"])
def test_audit_fixtures_are_what_the_files_load_to(tmp_path, name, text):
    """The audit's firewall parser is tested on fixtures; they must still be what the
    shipped files load to, or a change to a file goes past the audit's tests."""
    f = tmp_path / "r.nft"
    f.write_text(text())
    r = subprocess.run(["unshare", "-n", "sh", "-c", f"nft -f {f} && nft -j list ruleset"],
                       capture_output=True, text=True, timeout=CMD_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert comparable(r.stdout) == comparable(audit_fixture(name)), \
        f"regenerate {name} in {AUDIT_FIXTURES.name} (see its opening comment)"


@needs
def test_who_may_connect(tmp_path, netns, servers):
    """Loopback, IPv4 and IPv6: 10026 and the hold listener 10029 for restrict and
    root, 10027 for postfix; this host's SMTP ports stay open to everyone (the
    policy service's job)."""
    restrict, postfix, other = users()
    f = tmp_path / "r.nft"
    f.write_text(ruleset(restrict, postfix))
    ns = netns()
    load(ns, f)
    srv = servers(ns, [(a, p) for a in ("127.0.0.1", "::1") for p in (10026, 10027, 10029, 25, 587)])
    want = {}
    for a in ("127.0.0.1", "::1"):
        want.update({
            (restrict, a, 10026): "ok", ("root", a, 10026): "ok",
            (other, a, 10026): "refused", (postfix, a, 10026): "refused",
            (restrict, a, 10029): "ok", (other, a, 10029): "refused",
            (postfix, a, 10027): "ok", ("root", a, 10027): "refused",
            (other, a, 10027): "refused", (restrict, a, 10027): "refused",
            (other, a, 25): "ok", (other, a, 587): "ok",
        })
    got = outcomes(ns, want)
    assert got == want
    # The refusals were the firewall's: the listener saw only the allowed ones.
    assert sorted(srv.stop()) == accepted(want, got)


@needs
def test_smtp_out_only_for_postfix(tmp_path, netns, servers):
    """A remote mail server in a second namespace: www-data is reset on 25, 465
    and 587 (IPv4 and IPv6) and still reaches 443; postfix reaches all three
    SMTP ports; root is reset too with the shipped default. This host's own
    address is not another host: www-data still reaches its port 25."""
    restrict, postfix, other = users()
    f = tmp_path / "r.nft"
    f.write_text(ruleset(restrict, postfix))
    here, remote = netns(), netns()
    link(here, remote)
    load(here, f)
    far = servers(remote, [(a, p) for a in (REMOTE4, REMOTE6) for p in (25, 465, 587, 443)])
    near = servers(here, [(LOCAL4, 25), (LOCAL6, 25)])

    want = {}
    for a in (REMOTE4, REMOTE6):
        for p in (25, 465, 587):
            want[(other, a, p)] = "refused"
            want[(postfix, a, p)] = "ok"
        want[(other, a, 443)] = "ok"
        want[("root", a, 25)] = "refused"
    got = outcomes(here, want)
    assert got == want
    assert sorted(far.stop()) == accepted(want, got)

    own = {(other, LOCAL4, 25): "ok", (other, LOCAL6, 25): "ok"}
    assert outcomes(here, own) == own
    assert sorted(near.stop()) == [f"{LOCAL4} 25", f"{LOCAL6} 25"]


@needs
def test_smtp_out_root_choice(tmp_path, netns, servers):
    """With the commented-out smtp_out_users line taken instead, root reaches
    the remote server's 25 too; www-data still does not."""
    restrict, postfix, other = users()
    f = tmp_path / "r.nft"
    f.write_text(with_root_out(ruleset(restrict, postfix)))
    here, remote = netns(), netns()
    link(here, remote)
    load(here, f)
    far = servers(remote, [(a, 25) for a in (REMOTE4, REMOTE6)])
    want = {}
    for a in (REMOTE4, REMOTE6):
        want.update({("root", a, 25): "ok", (postfix, a, 25): "ok", (other, a, 25): "refused"})
    got = outcomes(here, want)
    assert got == want
    assert sorted(far.stop()) == accepted(want, got)


@needs
def test_no_policy_variant_closes_local_smtp(tmp_path, netns, servers):
    """restrictpd.nft plus restrictpd-no-policy.nft: www-data is reset on this
    host's 25, 465 and 587 (127.0.0.1, ::1 and the host's other address);
    postfix and root still reach them; 10026/10027 are as without it."""
    restrict, postfix, other = users()
    f = tmp_path / "r.nft"
    f.write_text(ruleset(restrict, postfix))
    g = tmp_path / "n.nft"
    g.write_text(no_policy_ruleset(postfix))
    here, remote = netns(), netns()
    link(here, remote)
    load(here, f)
    load(here, g)
    local = ("127.0.0.1", "::1", LOCAL4, LOCAL6)
    srv = servers(here, [(a, p) for a in local for p in (25, 465, 587)]
                  + [(a, p) for a in ("127.0.0.1", "::1") for p in (10026, 10027)])
    want = {}
    for a in local:
        for p in (25, 465, 587):
            want[(other, a, p)] = "refused"
        for p in (25, 587):
            want[(postfix, a, p)] = "ok"
            want[("root", a, p)] = "ok"
    for a in ("127.0.0.1", "::1"):
        want[(restrict, a, 10026)] = "ok"
        want[(other, a, 10026)] = "refused"
        want[(postfix, a, 10027)] = "ok"
        want[(other, a, 10027)] = "refused"
    got = outcomes(here, want)
    assert got == want
    assert sorted(srv.stop()) == accepted(want, got)
