"""systemd notification protocol (design decision 10): READY, STATUS, RELOADING, STOPPING and the
watchdog, observed on an AF_UNIX datagram socket given as NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import threading
import time

import daemonlib as dl

RULES_OLD = "user root\n    allow @old.example\n"
RULES_NEW = "user root\n    allow @new.example\n"


def start(lab, rules=RULES_OLD, settings="", on_message=None, env=None, **kw):
    port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{port}", rules=rules, settings=settings)
    notify = lab.notify(on_message)
    daemon = lab.daemon(config, env={"NOTIFY_SOCKET": notify.path, **(env or {})}, **kw)
    return port, config, notify, daemon


def wait_ready(notify, start=0, timeout=10.0):
    return notify.wait_for(lambda t: "READY=1" in t.split("\n"), timeout, start, what="READY=1")


def test_ready_only_when_the_port_accepts(lab):
    probe = {}
    port_holder = {}

    def on_message(text):
        if "READY=1" in text.split("\n") and "accepts" not in probe:
            # Probe in the reader thread, at the moment the datagram is read.
            probe["accepts"] = dl.port_accepts(port_holder["port"], timeout=1.0)

    port = dl.free_port()
    port_holder["port"] = port
    config = lab.config(listen=f"127.0.0.1:{port}", rules=RULES_OLD)
    notify = lab.notify(on_message)
    lab.daemon(config, env={"NOTIFY_SOCKET": notify.path})
    i = wait_ready(notify)
    assert probe.get("accepts") is True, "READY=1 was sent before the listener accepted connections"
    # READY carries a STATUS with the figures at once.
    f = dl.fields(notify.texts()[i])
    assert "STATUS" in f, notify.texts()[i]
    for figure in ("sessions=", "relayed=", "refused="):
        assert figure in f["STATUS"], f["STATUS"]


def test_status_figures_follow_the_traffic(lab):
    port, config, notify, daemon = start(lab)
    wait_ready(notify)
    code, lines = dl.send_message(port, ["a@old.example"])
    assert code == 250, lines
    code, lines = dl.send_message(port, ["b@other.example"])
    assert code == 550, lines
    # The housekeeping task sends STATUS= every few seconds when the figures changed.
    i = notify.wait_for(lambda t: "relayed=1" in t and "refused=1" in t and "STATUS=" in t, 12.0,
                        what="STATUS with relayed=1 refused=1")
    status = dl.fields(notify.texts()[i])["STATUS"]
    assert "sessions=" in status, status


def test_sighup_good_file_reloads(lab):
    port, config, notify, daemon = start(lab)
    r = wait_ready(notify)
    assert dl.send_message(port, ["a@new.example"])[0] == 550
    lab.config(listen=f"127.0.0.1:{port}", rules=RULES_NEW)
    daemon.signal(signal.SIGHUP)
    i = notify.wait_for(lambda t: "RELOADING=1" in t.split("\n"), 5.0, r + 1, what="RELOADING=1")
    j = wait_ready(notify, i + 1, timeout=5.0)
    assert j > i
    daemon.wait_log(r"reloaded")
    assert "reloaded" in dl.fields(notify.texts()[j]).get("STATUS", ""), notify.texts()[j]
    # The new rules are in force.
    assert dl.send_message(port, ["a@new.example"])[0] == 250
    assert dl.send_message(port, ["a@old.example"])[0] == 550
    assert daemon.running


def test_sighup_broken_file_keeps_the_old_rules(lab):
    port, config, notify, daemon = start(lab)
    r = wait_ready(notify)
    # A file whose rules would refuse old.example and allow new.example, with three errors.
    lines = [
        f"listen 127.0.0.1:{port}",                 # 1
        f"relay 127.0.0.1:{lab.relay.port}",        # 2
        "clients root",                             # 3
        f"state {lab.state}",                       # 4
        "idle_timeout banana",                      # 5  error
        "frobnicate yes",                           # 6  error
        "user root",                                # 7
        "    allow @new.example not-an-address",    # 8  error
        "",
    ]
    config.write_text("\n".join(lines))
    daemon.signal(signal.SIGHUP)
    i = notify.wait_for(lambda t: "RELOADING=1" in t.split("\n"), 5.0, r + 1, what="RELOADING=1")
    j = wait_ready(notify, i + 1, timeout=5.0)
    status = dl.fields(notify.texts()[j]).get("STATUS", "")
    assert "reload failed" in status, status
    daemon.wait_log(r"reload failed: keeping", timeout=5.0)
    log = daemon.log()
    for n in (5, 6, 8):
        assert f"{config}:{n}: " in log, f"no error for line {n} in the log:\n{log}"
    for n in (1, 2, 3, 4, 7):
        assert f"{config}:{n}: " not in log, f"spurious error for line {n}:\n{log}"
    assert "reloaded" not in log
    # Still serving, with the old rules.
    assert daemon.running
    assert dl.send_message(port, ["a@old.example"])[0] == 250
    assert dl.send_message(port, ["a@new.example"])[0] == 550


def test_sigterm_stopping_then_exit_0(lab):
    port, config, notify, daemon = start(lab)
    r = wait_ready(notify)
    daemon.signal(signal.SIGTERM)
    notify.wait_for(lambda t: "STOPPING=1" in t.split("\n"), 5.0, r + 1, what="STOPPING=1")
    assert daemon.wait_exit(10) == 0
    assert not dl.port_accepts(port)


def test_watchdog_pings_at_half_the_interval(lab):
    port, config, notify, daemon = start(
        lab, env={"WATCHDOG_USEC": "400000"}, shell_prefix="export WATCHDOG_PID=$$")
    r = wait_ready(notify)
    t0 = notify.snapshot()[r][0]
    time.sleep(1.6)
    pings = [t for t, text in notify.snapshot() if "WATCHDOG=1" in text.split("\n") and t >= t0]
    window = [t for t in pings if t <= t0 + 1.5]
    assert len(window) >= 5, f"{len(window)} WATCHDOG=1 in 1.5 s (expected ~7 at 200 ms)"
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) <= 0.45, f"largest gap between pings {max(gaps):.3f}s (expected ~0.2)"
    assert min(gaps) >= 0.05, f"pings too close together: {min(gaps):.3f}s"


def test_watchdog_for_another_pid_is_not_ours(lab):
    # WATCHDOG_PID names some other process: sd_watchdog_enabled says no, so no pings.
    port, config, notify, daemon = start(lab, env={"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"})
    r = wait_ready(notify)
    time.sleep(1.0)
    assert not [t for t in notify.texts() if "WATCHDOG=1" in t.split("\n")]


def test_peer_check_off_is_announced(lab):
    port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{port}", settings="peer_check no\n")
    daemon = lab.daemon(config)
    daemon.wait_ready_log()
    lines = daemon.wait_log(r"warning: .*peer_check is off")
    assert lines


def test_reload_of_listen_needs_a_restart(lab):
    port, config, notify, daemon = start(lab)
    r = wait_ready(notify)
    other = dl.free_port()
    lab.config(listen=f"127.0.0.1:{other}", rules=RULES_NEW)
    daemon.signal(signal.SIGHUP)
    wait_ready(notify, r + 1, timeout=5.0)
    daemon.wait_log(r"take effect only at restart")
    assert dl.port_accepts(port) and not dl.port_accepts(other)
    assert dl.send_message(port, ["a@new.example"])[0] == 250
