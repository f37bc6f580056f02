"""The logcheck rules in etc/logcheck/ignore.d.server/restrictpd, applied the way
logcheck(8) applies them: blank and comment lines dropped, then
`grep -E --text -v -f RULES` over the log. Routine lines must vanish; every
refusal, deferral, peer refusal, warning and error must stay, and so must
the kernel's lines for the refusals of the shipped nftables rules.

The lines follow restrictpd's decision line (Sources/RestrictDaemon/System/DecisionLog.swift)
as rsyslog writes it, in both timestamp formats Debian's logcheck-database
rules accept (traditional and RFC 3339)."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES = ROOT / "etc" / "logcheck" / "ignore.d.server" / "restrictpd"

OLD = "Nov 27 09:13:34 lab restrictpd[1234]: "
OLD_PAD = "Nov  7 19:03:04 mail-1.example.org restrictpd[7]: "
RFC = "2026-11-27T09:13:34.123456+01:00 lab restrictpd[1234]: "

ROUTINE = [
    # A PostgreSQL quota store found ready at start.
    OLD + 'quota store postgresql://restrictpd@db.example.org:5432/restrictpd?sslmode=verify-full, scope web-farm: '
    'schema version 1',
    OLD + '62F36F78196: uid=33 user=www-data from=<www-data@lab.localdomain> to=<carol@example.com> '
    'verdict=relayed reason="allowed" relay="250 2.0.0 Ok: queued as 6810AF781A5"',
    RFC + '62F36F78196: uid=33 user=www-data from=<www-data@lab.localdomain> to=<carol@example.com> '
    'verdict=relayed reason="allowed" relay="250 2.0.0 Ok: queued as 6810AF781A5"',
    OLD_PAD + '4Kx9Ds1Zw3zB: uid=0 user=root from=<> to=<a@example.org>,<b@example.net> '
    'verdict=relayed reason="allowed" relay="250 2.0.0 Ok: queued as 4Kx9Ds2pQ4z1"',
    OLD + 'A1B2C3: uid=33 user=www-data from=<www-data@lab.localdomain> to=<x@example.com> '
    'verdict=relayed reason="quota" quota="17/20 per day" relay="250 2.0.0 Ok: queued as B2C3D4"',
    OLD + 'A1B2C3: uid=1001 user=nagios from=<nagios@lab> to=<ops@example.com> '
    'verdict=relayed reason="learned" quota="3/3" relay="250 2.0.0 Ok: queued as B2C3D4"',
    OLD + 'A1B2C3: uid=1002 from=<u@lab> to=<a \\"quoted\\" local@example.com> '
    'verdict=relayed reason="allowed" relay="250 2.0.0 Ok: queued as B2C3D4"',
    OLD + 'A1B2C3: uid=0 user=root from=<root@lab> to=' + ",".join(f"<r{i}@example.com>" for i in range(20))
    + ',...(25 in all) verdict=relayed reason="allowed" relay="250 2.0.0 Ok: queued as B2C3D4"',
    # The door each message came through.
    OLD + '62F36F78196: uid=33 user=www-data door=pickup from=<www-data@lab.localdomain> to=<carol@example.com> '
    'verdict=relayed reason="allowed" relay="250 2.0.0 Ok: queued as 6810AF781A5"',
    OLD + 'NOQUEUE: uid=33 user=www-data door=smtp client=127.0.0.1:40000 from=<www-data@lab> to=<carol@example.com> '
    'verdict=relayed reason="allowed"',
    RFC + '4F1A2B3C: uid=33 user=www-data door=smtp client=[::1]:40000 from=<> to=<a@example.com>,<b@example.net> '
    'verdict=relayed reason="within quota" quota="17/20 per day"',
    OLD + 'NOQUEUE: uid=unknown door=smtp client=127.0.0.1:40000 from=<alice@example.org> to=<x@example.net> '
    'verdict=relayed reason="SASL-authenticated session trusted (smtp_authenticated trust)" sasl="alice@example.org"',
    # The X-PHP-Originating-Script hint on a relayed message is routine too.
    OLD + '62F36F78196: uid=33 user=www-data door=pickup from=<www-data@lab.localdomain> to=<carol@example.com> '
    'verdict=relayed reason="allowed" script="33:contact.php \\\"x\\\"" relay="250 2.0.0 Ok: queued as 6810AF781A5"',
    OLD + "listening on 127.0.0.1:10028 (policy service)",
    # Start-up, reload and stop (Sources/RestrictDaemon/Daemon.swift).
    OLD + "running as restrict (uid 103)",
    OLD + "listening on 127.0.0.1:10027",
    OLD + "listening on [::1]:10027",
    OLD + "listening on smtp (fd 3, from systemd)",
    OLD + "restrictpd 0.1.0 ready: 4 rules, relay 127.0.0.1:10026",
    RFC + "reloaded /etc/restrictpd.conf: 4 rules",
    OLD + "signal TERM: stopping; draining 0 sessions",
    OLD + "signal INT: stopping; draining 3 sessions",
    OLD + "stopped: 0 sessions, 12 relayed, 3 refused, 1 deferred",
    # Swift's libdispatch, when it may not renice a worker thread (EPERM from the unit's
    # SystemCallFilter, EACCES without it): a few lines at every start, and the daemon is fine.
    OLD + "Failed to set thread priority for worker thread: pqc=0x5599bf43d930 errno=1",
    RFC + "Failed to set thread priority for worker thread: pqc=0x564324e83ca0 errno=13",
    # A notification the relay took: the event it reports has a visible line of its own, and
    # the mail is in the admin's mailbox.
    OLD + "notification about uid 33 sent to admin@example.org: 250 2.0.0 Ok: queued as 4dLk2X1a7Tz9",
    RFC + "notification about uid 0 sent to admin@example.org,ops@example.org: 250 2.0.0 Ok",
    # "systemctl reload" runs restrictpd --check-config first (ExecReload=); it logs this.
    OLD + "/etc/restrictpd.conf: OK: 5 rules, listen 127.0.0.1:10027, relay 127.0.0.1:10026",
]

VISIBLE = [
    # The PostgreSQL quota store failing: deferred mail, an admin's job.
    OLD + 'error: quota store postgresql://restrictpd@db.example.org:5432/restrictpd?sslmode=verify-full: deciding: '
    'no answer within state_timeout (2 s): database down or unreachable? (quota decisions are deferred with 451 4.3.0)',
    OLD + 'error: quota store postgresql://restrictpd@db:5432/restrictpd?sslmode=prefer: no restrictpd schema in this '
    'database: create it with restrictpd --init-store (quota decisions will be deferred with 451 4.3.0 until this is fixed)',
    # Refusals and deferrals (warning level).
    OLD + 'warning: 62F36F78196: uid=33 user=www-data from=<www-data@lab.localdomain> to=<spam@example.net> '
    'verdict=refused reason="<spam@example.net> not on the allow list"',
    RFC + 'warning: 62F36F78196: uid=33 user=www-data from=<www-data@lab.localdomain> to=<spam@example.net> '
    'verdict=deferred reason="quota exhausted" quota="20/20 per day"',
    OLD + 'warning: NOQUEUE: uid=unknown from=<x@y> to=<a@example.com> verdict=refused '
    'reason="unidentified sender (no pickup header)"',
    # Held mail and freezing must reach the admin: the held message waits for a human.
    OLD + 'warning: 62F36F78196: uid=33 user=www-data door=pickup from=<www-data@lab.localdomain> '
    'to=<spam@example.net> verdict=held reason="<spam@example.net> over quota" quota="0/20 per day" '
    'held_as=4dLk2X1a7Tz9 relay="250 2.0.0 Ok: queued as 4dLk2X1a7Tz9"',
    RFC + 'warning: 62F36F78196: uid=33 user=www-data door=pickup from=<www-data@lab.localdomain> '
    'to=<friend@example.org> verdict=held reason="uid frozen since 1800000000 (3 refusals per hour)" '
    'held_as=4dLk2X1a7Tz9 relay="250 2.0.0 Ok: queued as 4dLk2X1a7Tz9"',
    OLD + 'warning: NOQUEUE: uid=33 user=www-data door=smtp client=127.0.0.1:40000 from=<w@lab> '
    'to=<spam@example.net> verdict=held reason="<spam@example.net> not on the allow list"',
    OLD + 'warning: 62F36F78196: uid=33 user=www-data door=pickup from=<w@lab> to=<spam@example.net> '
    'verdict=deferred reason="<spam@example.net> over quota; hold relay: cannot connect to 127.0.0.1:10029: '
    'connection refused" quota="0/20 per day"',
    OLD + 'warning: 62F36F78196: uid=33 user=www-data door=pickup from=<w@lab> to=<spam@example.net> '
    'verdict=refused reason="<spam@example.net> not on the allow list" script="33:contact.php"',
    OLD + 'error: hold relay: cannot connect to 127.0.0.1:10029: connection refused; message deferred',
    OLD + 'crit: uid 33 (www-data) frozen: 3 refused, over-quota or held messages (freeze after 3 refusals '
    'per hour); every message is held until restrictpd --thaw www-data',
    # The freeze line stays visible whatever its prefix.
    OLD + 'fatal: uid 33 (www-data) frozen: 3 refused, over-quota or held messages (freeze after 3 refusals '
    'per hour); every message is held until restrictpd --thaw www-data',
    RFC + 'uid 33 (www-data) thawed by restrictpd --thaw',
    OLD + 'uid 33 (www-data) has used 16 of 20 per day arbitrary recipients (warn at 80%)',
    # The same without the prefix, should the level ever change: still visible.
    OLD + '62F36F78196: uid=33 user=www-data from=<w@lab> to=<s@example.net> '
    'verdict=refused reason="<s@example.net> not on the allow list"',
    OLD + '62F36F78196: uid=33 user=www-data from=<w@lab> to=<s@example.net> '
    'verdict=deferred reason="quota exhausted" quota="20/20 per day"',
    # A refusal whose attacker-chosen recipient imitates a relayed line: quotes are escaped.
    OLD + 'warning: 62F36F78196: uid=33 user=www-data from=<w@lab> '
    'to=<x verdict=relayed reason=\\"allowed\\" relay=\\"250 ok\\"@example.net> verdict=refused '
    'reason="<x verdict=relayed reason=\\"allowed\\" relay=\\"250 ok\\"@example.net> not on the allow list"',
    # Relayed, but the relay's reply was not 2xx: not routine.
    OLD + '62F36F78196: uid=0 user=root from=<root@lab> to=<a@example.com> verdict=relayed '
    'reason="allowed" relay="451 4.3.0 Error: queue file write error"',
    # The SMTP door's refusals and deferrals, and one that imitates a routine line.
    OLD + 'warning: NOQUEUE: uid=33 user=www-data door=smtp client=127.0.0.1:40000 from=<w@lab> to=<s@example.net> '
    'verdict=refused reason="<s@example.net> not on the allow list"',
    OLD + 'warning: NOQUEUE: uid=33 user=www-data door=smtp client=127.0.0.1:40000 from=<w@lab> to=<s@example.net> '
    'verdict=deferred reason="<s@example.net> over quota" quota="0/20 per day"',
    OLD + 'error: NOQUEUE: door=smtp client=127.0.0.1:40000 verdict=deferred reason="cannot learn the client\'s uid"',
    OLD + 'warning: NOQUEUE: uid=33 user=www-data door=smtp client=127.0.0.1:40000 from=<w@lab> '
    'to=<x verdict=relayed reason=\\"allowed\\"@example.net> verdict=refused '
    'reason="<x verdict=relayed reason=\\"allowed\\"@example.net> not on the allow list"',
    OLD + "warning: policy connect from 127.0.0.1:45678 uid=1000 user=mallory refused: not in clients",
    OLD + "warning: policy request from 127.0.0.1:45678 refused: malformed attribute line \"foo\"",
    # The intrusion alarm.
    OLD + "warning: connect from 127.0.0.1:45678 uid=1000 user=mallory refused: not in clients",
    RFC + "warning: connect from [::1]:45678 uid=65534 user=nobody refused: not in clients",
    OLD + "warning: connect from 127.0.0.1:45678 refused: cannot learn the peer's uid: sock_diag failed",
    OLD + "warning: connect from 127.0.0.1:45678 refused: 100 sessions already (max_sessions)",
    # A notification that did not go out: the admin hears of the event only here.
    OLD + "warning: notification about uid 33 not sent (try 1), again in 60 s: relay answered MAIL FROM:<> with "
    "451 4.3.0 try later",
    OLD + "error: notification about uid 33 given up after 8 tries: relay answered DATA with 554 5.5.1 no",
    OLD + "error: notification about uid 33 dropped: 1000 notifications already wait to be sent",
    # A failed notification whose reply would match the sent line without its prefix.
    OLD + "notification about uid 33 not sent (try 1), again in 60 s: 250 sent to x: 250 ok",
    # Warnings and errors.
    OLD + "warning: peer_check is off: any local user who can connect can claim any uid",
    OLD + "fatal: /etc/restrictpd.conf:12: unknown user 'www-date'",
    OLD + "error: reload failed: /etc/restrictpd.conf:12: unknown user 'www-date'",
    OLD + "error: reload failed: keeping the rules in force (1 errors)",
    OLD + "reload: listen, unix_socket_*, and state changes take effect only at restart",
    OLD + "error: quota database error: database is locked",
    OLD + "fatal: cannot listen: Address already in use",
    OLD + "error: cannot connect to relay 127.0.0.1:10026: Connection refused",
    OLD + "warning: drain_timeout: closing 2 sessions with 421 4.3.2",
    OLD + "warning: timeout: idle; closing",
    # libdispatch failing for another reason (ENOMEM) is not the known harmless case.
    OLD + "Failed to set thread priority for worker thread: pqc=0x5599bf43d930 errno=12",
    # Another program's line that looks like ours.
    "Nov 27 09:13:34 lab fakepd[1]: listening on 127.0.0.1:10027",
]

# The firewall's refusals (etc/nftables/*.nft): kernel lines, one prefix per
# rule, with the UID that tried ("log ... flags skuid"). They must reach the
# admin. The packet part is the kernel's format (nf_log_syslog) for an
# outgoing SYN; kernel lines come with the printk time (imklog) or without
# it (through journald).
NFT_DIR = ROOT / "etc" / "nftables"
FIREWALL_PREFIXES = [
    "restrictpd 10026 blocked: ",
    "restrictpd 10027 blocked: ",
    "restrictpd smtp-local blocked: ",
    "restrictpd smtp-out blocked: ",
]


def _v4(out, src, dst, dport):
    return (f"IN= OUT={out} SRC={src} DST={dst} LEN=60 TOS=0x00 PREC=0x00 TTL=64 ID=48103 DF "
            f"PROTO=TCP SPT=52314 DPT={dport} WINDOW=64240 RES=0x00 SYN URGP=0 UID=33 GID=33 ")


def _v6(out, src, dst, dport):
    return (f"IN= OUT={out} SRC={src} DST={dst} LEN=80 TC=0 HOPLIMIT=64 FLOWLBL=731249 "
            f"PROTO=TCP SPT=52314 DPT={dport} WINDOW=65476 RES=0x00 SYN URGP=0 UID=33 GID=33 ")


LO6 = "0000:0000:0000:0000:0000:0000:0000:0001"
REMOTE6 = "2001:0db8:0000:0000:0000:0000:0000:0019"
FIREWALL = [
    "Nov 27 09:13:34 lab kernel: [ 8312.402117] restrictpd 10026 blocked: "
    + _v4("lo", "127.0.0.1", "127.0.0.1", 10026),
    RFC.replace("restrictpd[1234]", "kernel") + "restrictpd 10026 blocked: " + _v6("lo", LO6, LO6, 10026),
    "Nov 27 09:13:34 lab kernel: restrictpd 10027 blocked: " + _v4("lo", "127.0.0.1", "127.0.0.1", 10027),
    "Nov  7 19:03:04 mail-1.example.org kernel: [12.000001] restrictpd 10027 blocked: "
    + _v6("lo", LO6, LO6, 10027),
    "Nov 27 09:13:34 lab kernel: [ 8312.402117] restrictpd smtp-out blocked: "
    + _v4("eth0", "203.0.113.5", "198.51.100.25", 25),
    RFC.replace("restrictpd[1234]", "kernel") + "restrictpd smtp-out blocked: "
    + _v6("eth0", "2001:0db8:0000:0000:0000:0000:0000:0005", REMOTE6, 587),
    "Nov 27 09:13:34 lab kernel: restrictpd smtp-local blocked: " + _v4("lo", "127.0.0.1", "127.0.0.1", 25),
    RFC.replace("restrictpd[1234]", "kernel") + "restrictpd smtp-local blocked: " + _v6("lo", LO6, LO6, 587),
]


def logcheck_filter(lines, tmp_path):
    """What logcheck does: clean the rule file, then grep -E --text -v -f."""
    clean = tmp_path / "rules"
    cleaned = [l for l in RULES.read_text().splitlines() if l.strip() and not l.startswith("#")]
    clean.write_text("\n".join(cleaned) + "\n")
    log = tmp_path / "log"
    log.write_text("\n".join(lines) + "\n")
    r = subprocess.run(["grep", "-E", "--text", "-v", "-f", str(clean), str(log)],
                       capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    assert r.stderr == ""
    return r.stdout.splitlines()


def test_rules_file_shape():
    text = RULES.read_text()
    assert text.endswith("\n")
    for n, line in enumerate(text.splitlines(), 1):
        # An empty pattern would match, and hide, every line.
        assert line.strip(), f"line {n} is empty"
        assert line.startswith(r"^(\w{3} [ :[:digit:]]{11}|[0-9T:.+-]{32}) [._[:alnum:]-]+ restrictpd\["), n
        assert line.endswith("$"), n
        re.compile(line.replace("[:digit:]", r"\d").replace("[:alnum:]", r"a-zA-Z0-9")
                   .replace("[:space:]", r"\s").replace("[:upper:]", "A-Z"))


@pytest.mark.skipif(shutil.which("grep") is None, reason="grep missing")
def test_routine_lines_are_hidden(tmp_path):
    assert logcheck_filter(ROUTINE, tmp_path) == []


@pytest.mark.parametrize("line", VISIBLE)
def test_alarming_lines_stay(tmp_path, line):
    assert logcheck_filter([line], tmp_path) == [line]


def test_mixed_log_keeps_exactly_the_alarms(tmp_path):
    mixed = [l for pair in zip(ROUTINE, VISIBLE) for l in pair] + ROUTINE[len(VISIBLE):] + VISIBLE[len(ROUTINE):]
    assert logcheck_filter(mixed, tmp_path) == VISIBLE


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.environ.get("RESTRICTPD_BIN"), reason="RESTRICTPD_BIN not set (scripts/test sets it)")
@pytest.mark.parametrize("user", ["root", "nobody"])
def test_real_startup_and_stop_lines_are_hidden(tmp_path, user):
    """The daemon's own start-up and stop lines, as it writes them today, are routine
    (with "nobody" it also drops privileges and says so, as it does as a root service)."""
    if user != "root" and os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    state = pathlib.Path(tempfile.mkdtemp(prefix="restrictpd-logcheck-"))
    state.chmod(0o777)
    port = _free_port()
    conf = tmp_path / "restrictpd.conf"
    conf.write_text(f"listen 127.0.0.1:{port}\nrelay 127.0.0.1:{_free_port()}\nclients root\n"
                    f"state {state}/quota.db\n\ndefault\n    refuse\nunknown\n    refuse\n")
    proc = subprocess.Popen([os.environ["RESTRICTPD_BIN"], "--config", str(conf), "--user", user,
                             "--log", "stderr", "--log-level", "info"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if " ready: " in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
        lines += rest.splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(state, ignore_errors=True)
    assert any(" ready: " in l for l in lines), lines
    if user != "root":
        assert any(": running as " in l for l in lines), lines
    # stderr lines are "restrictpd[PID]: ..."; syslog adds the timestamp and host.
    logged = ["Nov 27 09:13:34 lab " + l for l in lines if l.startswith("restrictpd[")]
    assert logged, lines
    assert logcheck_filter(logged, tmp_path) == []


def test_firewall_prefixes_are_the_tested_ones():
    """Every log prefix in the shipped nftables files has sample lines here
    (a new or renamed prefix must be added to FIREWALL)."""
    found = set()
    for f in NFT_DIR.glob("*.nft"):
        for line in f.read_text().splitlines():
            if not line.lstrip().startswith("#"):
                found.update(re.findall(r'\blog prefix "([^"]*)"', line))
    assert sorted(found) == FIREWALL_PREFIXES
    for prefix in FIREWALL_PREFIXES:
        assert sum(prefix in l for l in FIREWALL) == 2, prefix


@pytest.mark.parametrize("line", FIREWALL)
def test_firewall_lines_stay(tmp_path, line):
    assert logcheck_filter([line], tmp_path) == [line]


def test_firewall_lines_stay_among_routine_ones(tmp_path):
    mixed = [l for pair in zip(ROUTINE, FIREWALL) for l in pair] + ROUTINE[len(FIREWALL):]
    assert logcheck_filter(mixed, tmp_path) == FIREWALL
