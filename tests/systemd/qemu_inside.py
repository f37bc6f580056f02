#!/usr/bin/env python3
"""Runs inside the QEMU (TCG) test system, which has a real kernel of its own: the checks of
the unit's sandbox that systemd-nspawn on a shared host kernel accepts but does not enforce
(IPAddressDeny=/IPAddressAllow=, DevicePolicy=, the limits). Reuses inside.py's helpers
and its first steps (install the package, wire Postfix, mail through it).

    python3 qemu_inside.py /path/to/restrictpd_VERSION_ARCH.deb
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import inside
from inside import RULES, check, log, run, unit_props, wait_journal, journal_mark

OUTSIDE = "192.0.2.1"  # TEST-NET-1, put on lo: not localhost, so the unit may not reach it
OUTSIDE_PORT = 10026


def in_unit_cgroup(code):
    """Runs python CODE in restrictpd.service's cgroup (as root, in the system's namespaces):
    the cgroup's BPF programs (IPAddressDeny=, DevicePolicy=) apply to it as to the daemon.
    Returns its output."""
    cgroup = unit_props("restrictpd.service", "ControlGroup")["ControlGroup"]
    check(cgroup, "restrictpd.service has no cgroup")
    prelude = (f"import os\nopen('/sys/fs/cgroup{cgroup}/cgroup.procs', 'w').write(str(os.getpid()))\n")
    r = run("python3", "-c", prelude + code, check_rc=False)
    check(r.returncode == 0, f"the probe in {cgroup} failed:\n{r.stdout}{r.stderr}")
    return r.stdout.strip()


# A connection the cgroup's egress filter drops never gets an answer: "dropped" is a timeout.
PROBE_CONNECT = """
import socket, errno
def probe(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except socket.timeout:
        return "dropped"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
"""

PROBE_OPEN = """
import errno
def probe(path):
    try:
        open(path, "rb").close()
        return "opened"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
"""


def step_ip_address_filter():
    """IPAddressDeny=any with IPAddressAllow=localhost: the unit reaches loopback, but not a
    non-local address, even one on the lo interface (neither a probe in its cgroup nor the
    daemon told to relay there)."""
    run("ip", "addr", "add", f"{OUTSIDE}/32", "dev", "lo")
    run("systemd-run", "--unit=test-outside", "--property=Type=exec", "--", "/usr/bin/python3", "-c",
        "import socket\n"
        f"s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('{OUTSIDE}', {OUTSIDE_PORT})); s.listen()\n"
        "n = 0\n"
        "while True:\n"
        "    c, _ = s.accept(); n += 1; open('/run/test-outside.count', 'w').write(str(n)); c.sendall(b'220 outside\\r\\n'); c.close()\n")
    inside.wait_until(lambda: inside.listening(OUTSIDE_PORT, OUTSIDE), 10, "the outside listener")
    # A loopback listener the unit may reach: the sink.
    inside.start_sink()
    # Control: from outside the unit the address is reachable.
    outside = run("python3", "-c", PROBE_CONNECT + f"print(probe('{OUTSIDE}', {OUTSIDE_PORT}))").stdout.strip()
    check(outside == "connected", f"control connection to {OUTSIDE}: {outside}")
    # From the unit's cgroup: the outside address is dropped, loopback is allowed.
    probed = in_unit_cgroup(PROBE_CONNECT + f"print(probe('{OUTSIDE}', {OUTSIDE_PORT}), probe('127.0.0.1', {inside.SINK_PORT}))")
    check(probed.split()[0] in ("EPERM", "dropped") and probed.split()[1] == "connected",
          f"from the unit's cgroup: {OUTSIDE} and 127.0.0.1:{inside.SINK_PORT} gave {probed}")
    log(f"probe in the unit's cgroup: {OUTSIDE}:{OUTSIDE_PORT} {probed.split()[0]}, 127.0.0.1:{inside.SINK_PORT} {probed.split()[1]}")
    # The daemon itself, told to relay there.
    inside.write_rules(f"relay {OUTSIDE}:{OUTSIDE_PORT}\nrelay_connect_timeout 3s\n" + RULES)
    run("systemctl", "restart", "restrictpd")
    since = journal_mark()
    count_before = Path("/run/test-outside.count").read_text()
    c = inside.FilterSession()
    codes = [c.reply()[0]]
    try:
        for line in ("EHLO localhost", "MAIL FROM:<root@example.org>", "RCPT TO:<x@example.com>", "DATA"):
            if codes[-1] >= 400:
                break
            codes.append(c.cmd(line)[0])
        if codes[-1] == 354:
            c.send(b"Received: by restrictpd-test.example.org (Postfix, from userid 0)\r\n"
                   b"\tid 1A; Mon, 1 Jan 2024 00:00:00 +0000 (UTC)\r\n\r\nx\r\n.\r\n")
            codes.append(c.reply()[0])
    except inside.StepFailed:
        pass  # the daemon may close the session after its 421
    finally:
        c.close()
    check(any(400 <= code < 500 for code in codes), f"the session's replies {codes}: no temporary failure")
    lines = wait_journal(r"relay|4\.4\.1", since)
    check(Path("/run/test-outside.count").read_text() == count_before, "the daemon reached the outside relay")
    log(f"daemon relaying to {OUTSIDE}: replies {codes}; journal: {lines[0]}")
    inside.write_rules()
    run("systemctl", "restart", "restrictpd")
    run("systemctl", "stop", "test-outside")
    run("ip", "addr", "del", f"{OUTSIDE}/32", "dev", "lo")


def step_device_policy():
    """DevicePolicy=closed: a process in the unit's cgroup cannot open a block device that
    exists in its mount namespace (the test's probe does not get PrivateDevices=' /dev),
    while /dev/null stays allowed; outside the unit the same opens work."""
    outside = run("python3", "-c", PROBE_OPEN + "print(probe('/dev/vda'), probe('/dev/null'))").stdout.strip()
    check(outside.split() == ["opened", "opened"], f"control opens outside the unit: {outside}")
    probed = in_unit_cgroup(PROBE_OPEN + "print(probe('/dev/vda'), probe('/dev/null'))")
    check(probed.split() == ["EPERM", "opened"], f"from the unit's cgroup: /dev/vda and /dev/null gave {probed}")
    log(f"probe in the unit's cgroup: /dev/vda {probed.split()[0]}, /dev/null {probed.split()[1]}; outside: {outside}")


# The unit's limits (debian/restrictpd.service), as the kernel should carry them.
NOFILE = 65536
TASKS_MAX = 1024
MEMORY_HIGH = 768 << 20
MEMORY_MAX = 1 << 30


def cgroup_file(name):
    cgroup = unit_props("restrictpd.service", "ControlGroup")["ControlGroup"]
    check(cgroup, "restrictpd.service has no cgroup")
    return Path(f"/sys/fs/cgroup{cgroup}/{name}").read_text().strip()


def step_limits():
    """The unit's limits in force: the daemon's open-file limit (soft and hard) in
    /proc/PID/limits, and memory.high, memory.max and pids.max in the service's cgroup."""
    pid = inside.main_pid()
    soft, hard = inside.open_files(pid)
    check(soft == hard == NOFILE, f"open files soft {soft}, hard {hard}; the unit sets LimitNOFILE={NOFILE}")
    got = {name: cgroup_file(name) for name in ("memory.high", "memory.max", "pids.max", "memory.current", "pids.current")}
    want = {"memory.high": str(MEMORY_HIGH), "memory.max": str(MEMORY_MAX), "pids.max": str(TASKS_MAX)}
    check(all(got[k] == v for k, v in want.items()), f"the service's cgroup has {got}, the unit asks for {want}")
    log(f"/proc/{pid}/limits: open files soft {soft}, hard {hard}")
    log("cgroup: " + ", ".join(f"{k} {v}" for k, v in got.items()))


# A transient service with small limits of the same kinds, each exceeded on purpose.
OVER_MEMORY = "b = b'x' * (256 << 20)\n"  # 256 MiB touched, past a 64 MiB MemoryMax=
OVER_TASKS = """
import threading, time
started = 0
try:
    for _ in range(64):
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
        started += 1
except RuntimeError as e:
    print(f"threads started: {started}; then: {e}", flush=True)
    raise SystemExit(3)
"""


def transient(name, code, *props):
    """Runs python CODE as a transient service with PROPS; its Result= and output."""
    argv = ["systemd-run", f"--unit={name}", "--wait", "--pipe", "--collect"]
    argv += [f"--property={p}" for p in props]
    r = run(*argv, "/usr/bin/python3", "-c", code, check_rc=False, timeout=60)
    return r.returncode, (r.stdout + r.stderr).strip()


def step_limits_enforced():
    """The kernel enforces these kinds of limit on a service here: one that touches 256 MiB
    under MemoryMax=64M is OOM-killed; one that starts 64 threads under TasksMax=16 is
    refused the 16th."""
    rc, out = transient("test-memory-max", OVER_MEMORY, "MemoryMax=64M", "MemorySwapMax=0")
    check(rc != 0 and "Finished with result: oom-kill" in out, f"256 MiB under MemoryMax=64M: exit {rc}, {out}")
    log(f"MemoryMax=64M, 256 MiB touched: exit {rc}, " + " ".join(ln for ln in out.splitlines() if "result" in ln))
    rc, out = transient("test-tasks-max", OVER_TASKS, "TasksMax=16")
    m = re.search(r"threads started: (\d+)", out)
    check(rc == 3 and m and 8 <= int(m.group(1)) < 16, f"64 threads under TasksMax=16: exit {rc}, {out}")
    log(f"TasksMax=16, 64 threads: {out.splitlines()[0]}")


# Only what needs the kernel of its own: the rest (Postfix, mail, the journal, reload, ...)
# is tests/systemd/run's, and under TCG every step costs several times as much.
STEPS = [
    ("install the package", inside.step_install_package),
    ("IPAddressDeny/IPAddressAllow enforced", step_ip_address_filter),
    ("DevicePolicy enforced", step_device_policy),
    ("limits of the unit", step_limits),
    ("limits enforced by the kernel", step_limits_enforced),
]

if __name__ == "__main__":
    inside.STEPS = STEPS
    sys.exit(inside.main())
