"""restrictpd --audit against a live private Postfix wired as README and etc/postfix/ give it.

The whole module runs in a network namespace of its own (unshare(CLONE_NEWNET) of this
thread, undone at the end), so the real ports can be used: pickup's content filter on
127.0.0.1:10027, the reinjection smtpd on 127.0.0.1:10026, the policy service on 10028 and
an smtpd on 127.0.0.1:25, with a small nftables table "inet restrictpd" that keeps users
other than root (restrictpd runs as root here) off 10026 and the hold listener's 10029, and
off SMTP ports of other hosts. Nothing of this touches the host's network or firewall.

The audit itself runs in a mount namespace of its own where /run and systemd's unit
directories are empty but for /run/systemd/system: it sees a systemd that runs and no
restrictpd.service, whatever this machine runs.

The wiring audits clean (exit 0). Then each fault is injected alone (postconf, a file edit
or an nft command, then `postfix reload`), the audit must name it in a FAIL line and exit 1,
and the fault is undone. One Postfix start for the module.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

ROOT = harness.repo_root()
MASTER_CF_RESTRICTPD = ROOT / "etc" / "postfix" / "master.cf.restrictpd"
MAIN_CF_RESTRICTPD = ROOT / "etc" / "postfix" / "main.cf.restrictpd"
CLONE_NEWNET = 0x40000000
FILTER, RELAY, POLICY, SMTP, HOLD = 10027, 10026, 10028, 25, 10029

# Only root (restrictpd's user in these tests) may open connections to the reinjection smtpd
# and the hold listener, or SMTP connections to other hosts (there are none in the namespace).
REINJECTION_RULE = f"tcp dport {{ {RELAY}, {HOLD} }} meta skuid != 0 reject with tcp reset"
OUTBOUND_RULE = 'oifname != "lo" tcp dport { 25, 465, 587 } meta skuid != 0 reject with tcp reset'


def firewall(*rules: str) -> str:
    body = "\n".join(f"        {r}" for r in rules)
    return f"""table inet restrictpd {{
    chain output {{
        type filter hook output priority 0; policy accept;
{body}
    }}
}}
"""


FIREWALL = firewall(REINJECTION_RULE, OUTBOUND_RULE)

# The audit's view of systemd: running, without restrictpd.service (see the module's text).
HIDE_SYSTEMD = """set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/system
for d in /etc/systemd/system /usr/local/lib/systemd/system /lib/systemd/system /usr/lib/systemd/system; do
    if [ -d "$d" ]; then mount -t tmpfs tmpfs "$d"; fi
done
exec "$@"
"""

pytestmark = [
    pytest.mark.needs_restrictpd,
    pytest.mark.skipif(not all(shutil.which(t) for t in ("nft", "ip", "unshare")), reason="needs nft, ip and unshare"),
]


# ----------------------------------------------------------------------------------------------
# the shipped snippets


def master_entries(path: Path) -> list[str]:
    """The master.cf entries of `path` (comments dropped, continuation lines kept), with
    chroot off as everywhere in the test instance (no resolver files in its spool)."""
    entries: list[list[str]] = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            entries[-1].append(line)
            continue
        fields = line.split()
        fields[4] = "n"
        entries.append([" ".join(fields)])
    return ["\n".join(e) for e in entries]


def main_parameters(path: Path) -> dict[str, str]:
    """main.cf parameters of `path`, continuation lines joined."""
    params: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and key:
            params[key] += " " + line.strip()
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        params[key] = value.strip()
    return params


# ----------------------------------------------------------------------------------------------
# the namespace, Postfix and restrictpd


@contextlib.contextmanager
def own_network_namespace():
    """This thread (and what it starts) in a new network namespace with loopback up."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            pytest.skip(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
        harness.run(["ip", "link", "set", "lo", "up"])
        yield
    finally:
        if libc.setns(original, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
        os.close(original)


def postconf(pf: harness.PostfixInstance, *args: str) -> None:
    harness.run([harness.POSTCONF, "-c", str(pf.etc), *args])


def reload(pf: harness.PostfixInstance) -> None:
    harness.run([harness.POSTFIX, "-c", str(pf.etc), "reload"])


def wire(pf: harness.PostfixInstance) -> None:
    """The wiring of etc/postfix/: pickup and the reinjection smtpd as master.cf.restrictpd
    has them, main.cf.restrictpd's restrictions, and an smtpd on 127.0.0.1:25."""
    for service in ("pickup/unix", f"127.0.0.1:{pf.relay_port}/inet", f"127.0.0.1:{pf.relay_port_debian}/inet"):
        postconf(pf, "-M", "-X", service)
    with open(pf.etc / "master.cf", "a") as f:
        f.write("\n# from etc/postfix/master.cf.restrictpd\n")
        f.write("\n".join(master_entries(MASTER_CF_RESTRICTPD)) + "\n")
        f.write("# port 25 on loopback, as Debian ships it\n")
        f.write("smtp inet n - n - - smtpd\n")
    params = main_parameters(MAIN_CF_RESTRICTPD)
    for key in ("smtpd_relay_restrictions", "smtpd_end_of_data_restrictions"):
        postconf(pf, "-e", f"{key} = {params[key]}")


def audit_config(state_dir: Path) -> str:
    return (f"listen 127.0.0.1:{FILTER}\n"
            f"policy_listen 127.0.0.1:{POLICY}\n"
            f"relay 127.0.0.1:{RELAY}\n"
            f"clients postfix\n"
            f"state {state_dir}/quota.db\n"
            f"drain_timeout 1s\n\n" + harness.STANDARD_RULES)


class Lab:
    def __init__(self, pf: harness.PostfixInstance, rpd: harness.Restrictpd, binary: Path):
        self.pf, self.rpd, self.binary = pf, rpd, binary

    def audit(self, *extra: str, mail_config: bool = False) -> subprocess.CompletedProcess:
        """The audit of this instance, named with --postfix-config or, with `mail_config`,
        through MAIL_CONFIG in the environment."""
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", HIDE_SYSTEMD, "sh",
                str(self.binary), "--audit", "--config", str(self.rpd.config), "--user", "root"]
        env = dict(os.environ)
        env.pop("MAIL_CONFIG", None)
        if mail_config:
            env["MAIL_CONFIG"] = str(self.pf.etc)
        else:
            argv += ["--postfix-config", str(self.pf.etc)]
        return subprocess.run(argv + list(extra), capture_output=True, text=True, timeout=60, env=env)

    def checks(self, *extra: str) -> tuple[int, list[tuple[str, str]], str]:
        """(exit status, [(status, name)], text) of one text-form audit."""
        r = self.audit(*extra)
        lines = r.stdout.splitlines()
        parsed = [m.groups() for m in (re.match(r"^(OK|WARN|FAIL)\s+(\S+): ", l) for l in lines) if m]
        assert len(parsed) == len(lines), f"lines not in the OK/WARN/FAIL form:\n{r.stdout}\n{r.stderr}"
        return r.returncode, parsed, r.stdout + r.stderr


@pytest.fixture(scope="module")
def lab(e2e_environment, restrictpd_binary, tmp_path_factory):
    with own_network_namespace():
        harness.run(["nft", "-f", "-"], input=FIREWALL.encode())
        slot = harness.Slot.acquire()
        pf = harness.PostfixInstance(slot, sink_port=1, filter_port=FILTER, relay_port=RELAY,
                                     relay_port_debian=harness.free_port())
        rpd = None
        try:
            pf.configure(content_filter=False)
            wire(pf)
            harness.run([harness.POSTFIX, "-c", str(pf.etc), "start"])
            harness.wait_until(lambda: harness.port_accepts(RELAY) and harness.port_accepts(SMTP),
                               30, 0.1, "the reinjection smtpd and the port 25 smtpd")
            work = tmp_path_factory.mktemp("audit")
            (work / "state").mkdir()
            rpd = harness.Restrictpd(work / "rpd", audit_config(work / "state"), FILTER, restrictpd_binary)
            os.chmod(rpd.config, 0o644)
            rpd.start()
            yield Lab(pf, rpd, restrictpd_binary)
        finally:
            if rpd is not None:
                rpd.stop()
            pf.stop()
            slot.release()


def fails(checks: list[tuple[str, str]]) -> set[str]:
    return {name for status, name in checks if status == "FAIL"}


# ----------------------------------------------------------------------------------------------
# tests


def test_wiring_as_documented_audits_clean(lab):
    rc, checks, text = lab.checks()
    print(text)  # the checklist, for the record (pytest -s)
    assert rc == 0, text
    assert not fails(checks), text
    names = {name for _, name in checks}
    # The checks the wiring must have passed, by name: each was looked at, none skipped.
    for name in ("postfix.pickup-filter", "postfix.reinjection", "postfix.reinjection-bare-newline",
                 "postfix.reinjection-policy", "postfix.hold-listener", "postfix.header-checks",
                 "postfix.smtp-header-checks", "postfix.login-sender-maps",
                 "postfix.smtpd-guard:smtp", "restrictpd.config", "restrictpd.config-file",
                 "restrictpd.peer-check", "restrictpd.clients", "restrictpd.unknown-rule",
                 f"restrictpd.listener:127.0.0.1:{FILTER}", f"restrictpd.listener:127.0.0.1:{POLICY}",
                 "reach.relay:www-data", "reach.relay:nobody", f"reach.filter:www-data:127.0.0.1:{FILTER}",
                 "reach.smtpd:www-data:smtp", "system.firewall"):
        assert name in names, f"{name} missing:\n{text}"
    # Measured, not inferred: www-data's child was turned away by the firewall and got 554.
    assert re.search(rf"OK   reach.filter:www-data:\S+: 127.0.0.1:{FILTER} answers www-data with 554", text), text
    assert re.search(r"OK   reach.smtpd:www-data:smtp: www-data reaches 127.0.0.1:25; restrictpd's policy service judges it", text), text
    assert "OK   system.firewall: table inet restrictpd guards port 10026 and outbound SMTP (25, 465, 587)" in text, text
    assert "OK   postfix.hold-listener: restrictpd.conf holds no mail" in text, text
    # Whether or not this machine runs systemd: the unit is not installed, which is no failure.
    assert "WARN system.service: restrictpd.service is not installed" in text, text


def test_json_matches_text(lab):
    _, text_checks, _ = lab.checks()
    r = lab.audit("--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    assert [(c["status"], c["name"]) for c in doc["checks"]] == text_checks
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "detail", "fix"}
        assert c["detail"]
        if c["status"] != "OK":
            assert c["fix"], c


@contextlib.contextmanager
def fault(lab: Lab, inject, undo, reload_postfix: bool = True):
    inject()
    if reload_postfix:
        reload(lab.pf)
    try:
        yield
    finally:
        undo()
        if reload_postfix:
            reload(lab.pf)


def header_checks_prepend(lab: Lab, parameter: str = "header_checks"):
    table = lab.pf.etc / parameter
    table.write_text("/^Subject:/ PREPEND X-Added: above pickup's header\n")
    postconf(lab.pf, "-e", f"{parameter} = regexp:{table}")


def set_global(lab: Lab, key: str, value: str | None):
    """A global line of restrictpd.conf (at the top), or none."""
    text = re.sub(rf"^{key} .*\n", "", lab.rpd.config.read_text(), flags=re.M)
    if value is not None:
        text = f"{key} {value}\n" + text
    lab.rpd.config.write_text(text)


def hold_listener_without_static_hold(lab: Lab):
    set_global(lab, "over_quota", "hold")
    postconf(lab.pf, "-P", f"127.0.0.1:{HOLD}/inet/smtpd_client_restrictions=")


def hold_listener_restored(lab: Lab):
    set_global(lab, "over_quota", None)
    postconf(lab.pf, "-P", f"127.0.0.1:{HOLD}/inet/smtpd_client_restrictions=check_client_access,static:HOLD")


def replace_firewall(text: str):
    harness.run(["nft", "delete", "table", "inet", "restrictpd"])
    harness.run(["nft", "-f", "-"], input=text.encode())


def set_peer_check(lab: Lab, value: str | None):
    set_global(lab, "peer_check", value)


# (fault id, the FAIL checks it must cause, the FAIL checks it may also cause, inject, undo,
# reload Postfix)
FAULTS = [
    ("no-content-filter-on-pickup", {"postfix.pickup-filter"}, set(),
     lambda lab: postconf(lab.pf, "-P", "-X", "pickup/unix/content_filter"),
     lambda lab: postconf(lab.pf, "-P", f"pickup/unix/content_filter=smtp:[127.0.0.1]:{FILTER}"), True),
    ("reinjection-without-forbid-bare-newline", {"postfix.reinjection-bare-newline"}, set(),
     # Set, not removed: the default is "no" in Postfix 3.7 but "normalize" from 3.9.
     lambda lab: postconf(lab.pf, "-P", f"127.0.0.1:{RELAY}/inet/smtpd_forbid_bare_newline=no"),
     lambda lab: postconf(lab.pf, "-P", f"127.0.0.1:{RELAY}/inet/smtpd_forbid_bare_newline=reject"), True),
    ("unguarded-loopback-relay", {"postfix.smtpd-guard:smtp"},
     {"reach.smtpd:www-data:smtp", "reach.smtpd:nobody:smtp"},
     lambda lab: postconf(lab.pf, "-P", "smtp/inet/smtpd_relay_restrictions=permit_mynetworks,defer_unauth_destination"),
     lambda lab: postconf(lab.pf, "-P", "-X", "smtp/inet/smtpd_relay_restrictions"), True),
    ("prepend-on-pickups-path", {"postfix.header-checks"}, set(),
     header_checks_prepend,
     lambda lab: postconf(lab.pf, "-X", "header_checks"), True),
    # The content filter's smtp client (transport smtp of smtp:[127.0.0.1]:10027) prepends.
    ("smtp-header-checks-prepend", {"postfix.smtp-header-checks"}, set(),
     lambda lab: header_checks_prepend(lab, "smtp_header_checks"),
     lambda lab: postconf(lab.pf, "-X", "smtp_header_checks"), True),
    # restrictpd.conf holds over-quota mail; the hold listener would deliver it. Without
    # static:HOLD it is also an smtpd that relays for local clients (the firewall keeps
    # www-data and nobody off it).
    ("hold-listener-without-static-hold", {"postfix.hold-listener"}, {f"postfix.smtpd-guard:127.0.0.1:{HOLD}"},
     hold_listener_without_static_hold, hold_listener_restored, True),
    ("group-writable-config", {"restrictpd.config-file"}, set(),
     lambda lab: os.chmod(lab.rpd.config, 0o664),
     lambda lab: os.chmod(lab.rpd.config, 0o644), False),
    # The file as the next reload would apply it; the running daemon keeps checking peers.
    ("peer-check-no", {"restrictpd.peer-check"}, set(),
     lambda lab: set_peer_check(lab, "no"),
     lambda lab: set_peer_check(lab, None), False),
    ("reinjection-reachable-by-www-data", {"reach.relay:www-data"},
     {"reach.relay:nobody", "system.firewall"},
     lambda lab: harness.run(["nft", "delete", "table", "inet", "restrictpd"]),
     lambda lab: harness.run(["nft", "-f", "-"], input=FIREWALL.encode()), False),
    ("firewall-without-outbound-smtp-rules", {"system.firewall"}, set(),
     lambda lab: replace_firewall(firewall(REINJECTION_RULE)),
     lambda lab: replace_firewall(FIREWALL), False),
]


@pytest.mark.parametrize("fault_id,required,allowed,inject,undo,reload_postfix", FAULTS,
                         ids=[f[0] for f in FAULTS])
def test_fault_is_named(lab, fault_id, required, allowed, inject, undo, reload_postfix):
    with fault(lab, lambda: inject(lab), lambda: undo(lab), reload_postfix):
        rc, checks, text = lab.checks()
        assert rc == 1, text
        failed = fails(checks)
        assert required <= failed, f"{fault_id}: expected FAIL {sorted(required)}:\n{text}"
        assert failed <= required | allowed, f"{fault_id}: unrelated FAILs {sorted(failed - required - allowed)}:\n{text}"
        for line in text.splitlines():
            if line.startswith("FAIL"):
                assert " -- fix: " in line, line
    rc, checks, text = lab.checks()
    assert rc == 0, f"after undoing {fault_id}:\n{text}"


def test_json_matches_text_with_a_fault(lab):
    with fault(lab, lambda: os.chmod(lab.rpd.config, 0o664), lambda: os.chmod(lab.rpd.config, 0o644), False):
        rc, text_checks, _ = lab.checks()
        r = lab.audit("--json")
        assert rc == r.returncode == 1
        doc = json.loads(r.stdout)
        assert doc["ok"] is False
        assert [(c["status"], c["name"]) for c in doc["checks"]] == text_checks
        bad = [c for c in doc["checks"] if c["status"] == "FAIL"]
        assert [c["name"] for c in bad] == ["restrictpd.config-file"]
        assert "chmod go-w" in bad[0]["fix"]


def test_probe_outbound(lab):
    """--probe: a listener in the namespace stands in for a remote mail server; nothing
    keeps www-data from it here, so the audit must say so."""
    import socket
    with socket.socket() as server:
        server.bind(("127.0.0.2", 2525))
        server.listen(8)
        rc, checks, text = lab.checks("--probe", "127.0.0.2:2525")
    assert rc == 1, text
    assert {"reach.out:www-data", "reach.out:nobody"} == fails(checks), text
    assert "user www-data can open SMTP connections out" in text
    rc, checks, text = lab.checks("--probe", "127.0.0.2:2526")
    assert rc == 0 and ("OK", "reach.out:www-data") in checks, text


def running(binary: Path) -> dict[int, int]:
    """{pid: uid} of the processes running `binary` (the daemon as root; probe children
    as the users they became)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/exe") == str(binary):
                found[int(entry)] = os.stat(f"/proc/{entry}").st_uid
    return found


def test_silent_port_is_bounded_and_leaves_nothing_behind(lab):
    """A firewall that drops instead of refusing: each probe of 10026 waits out its own
    deadline, the audit still ends in bounded time, passes, and no child is left."""
    import time
    replace_firewall(FIREWALL.replace("reject with tcp reset", "drop"))
    try:
        started = time.monotonic()
        rc, checks, text = lab.checks()
        elapsed = time.monotonic() - started
    finally:
        replace_firewall(FIREWALL)
    assert rc == 0, text
    assert "www-data cannot connect to 127.0.0.1:10026 (Connection timed out)" in text, text
    assert elapsed < 20, f"audit took {elapsed:.1f}s"
    processes = running(lab.binary)
    assert processes.get(lab.rpd.proc.pid) == 0, processes  # the lookup sees the daemon
    assert [pid for pid, uid in processes.items() if uid != 0] == [], processes


def test_mail_config_names_the_instance(lab):
    r = lab.audit(mail_config=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"OK   postfix.postconf: read {lab.pf.etc} through postconf" in r.stdout


def test_hold_listener_as_shipped_holds(lab):
    """restrictpd.conf holds mail, and the shipped hold listener holds everything: clean."""
    with fault(lab, lambda: set_global(lab, "over_quota", "hold"), lambda: set_global(lab, "over_quota", None), False):
        rc, checks, text = lab.checks()
    assert rc == 0, text
    assert f"OK   postfix.hold-listener: 127.0.0.1:{HOLD}/inet at hold_relay 127.0.0.1:{HOLD} holds every message it accepts (over_quota hold)" in text, text
    assert f"OK   system.firewall: table inet restrictpd guards port {RELAY}, {HOLD} and outbound SMTP" in text, text
