"""Started as root, restrictpd binds, then drops to --user (uid, gid and supplementary groups)."""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess

import daemonlib as dl

NOBODY = pwd.getpwnam("nobody")


def proc_status(pid):
    text = open(f"/proc/{pid}/status").read()
    return {m.group(1): m.group(2).split() for m in re.finditer(r"^(\w+):[ \t]*(.*)$", text, re.M)}


def test_drops_to_nobody_and_still_serves(lab):
    port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{port}", rules="user root\n    allow @example.org\n    arbitrary 5\n")
    notify = lab.notify()
    daemon = lab.daemon(config, user="nobody", env={"NOTIFY_SOCKET": notify.path})
    notify.wait_for(lambda t: "READY=1" in t.split("\n"), 10, what="READY=1")
    # Every thread, the main thread (tid == pid, what /proc/PID/status shows) included: a thread
    # left as root shares the address space and signal handlers of the dropped ones, so the drop
    # would be undone by anyone who gets code execution in the daemon.
    still_root = []
    for tid in sorted(os.listdir(f"/proc/{daemon.pid}/task"), key=int):
        st = proc_status(f"{daemon.pid}/task/{tid}")
        comm = open(f"/proc/{daemon.pid}/task/{tid}/comm").read().strip()
        if (st["Uid"] != [str(NOBODY.pw_uid)] * 4 or st["Gid"] != [str(NOBODY.pw_gid)] * 4
                or "0" in st.get("Groups", []) or int(st["CapEff"][0], 16) != 0):
            still_root.append(f"tid {tid} ({comm}): Uid {st['Uid']} Gid {st['Gid']} "
                              f"Groups {st.get('Groups')} CapEff {st['CapEff']}")
    main_uid = proc_status(daemon.pid)["Uid"]
    # Still serves: an allowed message, and one that needs the quota database (opened as nobody).
    assert dl.send_message(port, ["a@example.org"])[0] == 250
    code, lines = dl.send_message(port, ["someone@elsewhere.test"])
    assert code == 250, lines
    assert lab.state.exists()
    assert lab.state.stat().st_uid == NOBODY.pw_uid
    daemon.wait_log(r'verdict=relayed.*quota="?[14]/5', timeout=5)
    assert main_uid == [str(NOBODY.pw_uid)] * 4 and not still_root, (
        "privileges not dropped in every thread:\n" + "\n".join(still_root))


def test_unknown_user_exits_nonzero_with_a_clear_message(lab):
    port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{port}")
    daemon = lab.daemon(config, user="nosuchuser")
    rc = daemon.wait_exit(10)
    assert rc != 0
    log = daemon.log()
    assert "nosuchuser" in log and "does not exist" in log, log
    assert not dl.port_accepts(port)


def test_admin_commands_as_root_leave_no_root_owned_database_files(lab):
    # The service (here nobody) made the quota database; root then runs --quota and
    # --reset-quota. SQLite's -wal/-shm files must not end up owned by root, or the
    # service could no longer open its own database.
    port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{port}", rules="user root\n    allow @example.org\n    arbitrary 5\n")
    daemon = lab.daemon(config, user="nobody")
    daemon.wait_ready_log()
    assert dl.send_message(port, ["someone@elsewhere.test"])[0] == 250
    for args in (["--quota"], ["--reset-quota", "root"], ["--test", "root", "x@elsewhere.test"]):
        out = subprocess.run([dl.binary(), "-c", str(config), *args], capture_output=True, text=True, timeout=30)
        assert out.returncode in (0, 2), out.stderr
    for f in lab.state.parent.iterdir():
        if f.name.startswith(lab.state.name):
            assert f.stat().st_uid == NOBODY.pw_uid, f"{f} is owned by uid {f.stat().st_uid}"
    # And the service still counts: the reset emptied root's destinations.
    assert dl.send_message(port, ["other@elsewhere.test"])[0] == 250
    daemon.wait_log(r'verdict=relayed.*quota="?4/5', timeout=5)


def test_quota_counts_survive_kill_9(lab):
    # Counted destinations are committed (SQLite WAL) before the message is relayed, so a
    # crash right after cannot give the quota back.
    port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{port}", rules="user root\n    allow @example.org\n    arbitrary 2 per day\n")
    daemon = lab.daemon(config)
    daemon.wait_ready_log()
    assert dl.send_message(port, ["one@elsewhere.test"])[0] == 250
    assert dl.send_message(port, ["two@elsewhere.test"])[0] == 250
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit(10)
    again = lab.daemon(config)
    again.wait_ready_log()
    # Both slots are still taken: a third new address is over quota, a counted one is free.
    code, lines = dl.send_message(port, ["three@elsewhere.test"])
    assert code == 451 and "4.7.1" in lines[0], lines
    assert dl.send_message(port, ["one@elsewhere.test"])[0] == 250
    out = subprocess.run([dl.binary(), "-c", str(config), "--quota", "root"], capture_output=True, text=True, timeout=30)
    assert "2 of 2 per day used" in out.stdout, out.stdout
