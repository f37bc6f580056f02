"""The admin's command line: --check-config, --version, --help, --test, --quota, --reset-quota."""

from __future__ import annotations

import re
import subprocess

import daemonlib as dl

RULES = """user root
    allow @allowed.example
    arbitrary 3
default
    allow @localhost
"""


def run(*args, timeout=20):
    return dl.spawn(lambda: subprocess.run([dl.binary(), *args], capture_output=True, text=True,
                                           timeout=timeout, env=dl.clean_env(), stdin=subprocess.DEVNULL))


def test_check_config_good(lab):
    config = lab.config(listen="127.0.0.1:10027", rules=RULES)
    r = run("--check-config", "--config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
    assert r.stderr == ""


def test_check_config_reports_every_error_with_its_line(lab):
    config = lab.dir / "bad.conf"
    config.write_text("\n".join([
        "listen 127.0.0.1:10027",            # 1
        "relay nowhere",                     # 2  error: bad relay address
        "# a comment",                       # 3
        "idle_timeout 99999",                # 4  error: out of range
        "",                                  # 5
        "user root",                         # 6
        "    allow *",                       # 7
        "    arbitrary lots",                # 8  error
        "user no-such-user-here",            # 9  error
        "    allow @x.example",              # 10
        "user root",                         # 11 error: duplicate rule
        "    allow @y.example",              # 12
        "max_sessions 5",                    # 13 error: global setting inside a rule
        "",
    ]))
    r = run("--check-config", "--config", str(config))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    pattern = re.compile(rf"^{re.escape(str(config))}:(\d+): \S")
    assert all(pattern.match(ln) for ln in lines), lines
    numbers = sorted(int(pattern.match(ln).group(1)) for ln in lines)
    assert numbers == [2, 4, 8, 9, 11, 13], lines


def test_check_config_missing_file(lab):
    r = run("--check-config", "--config", str(lab.dir / "nope.conf"))
    assert r.returncode == 1
    assert "nope.conf" in r.stderr


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+\s*", r.stdout), r.stdout
    r = run("--help")
    assert r.returncode == 0, r.stderr
    for word in ("--check-config", "--test", "--quota", "--reset-quota", "--user", "--log"):
        assert word in r.stdout, word


def test_test_verdicts(lab):
    config = lab.config(listen="127.0.0.1:10027", rules=RULES)
    r = run("--config", str(config), "--test", "root", "a@allowed.example")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict=relay" in r.stdout
    # Outside the allow list, within the quota: would relay, and spends nothing.
    r = run("--config", str(config), "--test", "root", "x@elsewhere.test")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not lab.state.exists(), "--test created the quota database"
    # `default` allows @localhost only, and refuses the rest: exit 2.
    r = run("--config", str(config), "--test", "nobody", "x@elsewhere.test")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "verdict=refuse" in r.stdout and "550 5.7.1" in r.stdout
    r = run("--config", str(config), "--test", "unknown", "a@allowed.example")
    assert r.returncode == 2, r.stdout + r.stderr
    r = run("--config", str(config), "--test", "no-such-user-here", "a@allowed.example")
    assert r.returncode == 1 and "no-such-user-here" in r.stderr


def test_quota_on_fresh_state(lab):
    config = lab.config(listen="127.0.0.1:10027", rules=RULES)
    r = run("--config", str(config), "--quota")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing counted" in r.stdout or "no quota database" in r.stdout, r.stdout
    r = run("--config", str(config), "--quota", "root")
    assert r.returncode == 0, r.stdout + r.stderr


def test_reset_quota_while_the_daemon_runs(lab):
    port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{port}", rules=RULES)
    daemon = lab.daemon(config)
    daemon.wait_ready_log()
    for rcpt in ("one@elsewhere.test", "two@elsewhere.test", "three@elsewhere.test"):
        code, lines = dl.send_message(port, [rcpt])
        assert code == 250, lines
    code, lines = dl.send_message(port, ["four@elsewhere.test"])
    assert code == 451 and "4.7.1" in lines[0], lines
    r = run("--config", str(config), "--quota", "root")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 of 3" in r.stdout and "two@elsewhere.test" in r.stdout, r.stdout
    r = run("--config", str(config), "--reset-quota", "root")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 counted destinations forgotten" in r.stdout, r.stdout
    r = run("--config", str(config), "--quota", "root")
    assert "3 of 3" not in r.stdout, r.stdout
    # The running daemon sees the reset at once.
    code, lines = dl.send_message(port, ["four@elsewhere.test"])
    assert code == 250, lines
    assert daemon.running
