"""The daemon's exit status when it cannot start: 78 (EX_CONFIG) for a wrong configuration,
which the unit's RestartPreventExitStatus= names so that systemd does not restart in a loop,
and 1 for everything else (a retry may help)."""

from __future__ import annotations

import socket

import daemonlib as dl

EX_CONFIG = 78


def test_config_errors_exit_78_with_file_and_line(lab):
    port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{port}", rules="user root\n    allow *\n    arbitrary lots\n")
    daemon = lab.daemon(config)
    assert daemon.wait_exit(10) == EX_CONFIG, daemon.log()
    # The rule starts after the five settings lines write_config puts first.
    assert f"{config}:8:" in daemon.log(), daemon.log()
    assert not dl.port_accepts(port)


def test_unknown_user_in_the_rules_exits_78(lab):
    config = lab.config(listen=f"127.0.0.1:{dl.free_port()}", rules="user no-such-user-here\n    allow *\n")
    daemon = lab.daemon(config)
    assert daemon.wait_exit(10) == EX_CONFIG, daemon.log()
    assert "no-such-user-here" in daemon.log()


def test_missing_configuration_file_exits_78(lab):
    daemon = lab.daemon(lab.dir / "nope.conf")
    assert daemon.wait_exit(10) == EX_CONFIG, daemon.log()
    assert "nope.conf" in daemon.log()


def test_port_in_use_exits_1(lab):
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        config = lab.config(listen=f"127.0.0.1:{taken.getsockname()[1]}")
        daemon = lab.daemon(config)
        assert daemon.wait_exit(10) == 1, daemon.log()
        assert "cannot listen" in daemon.log()
    finally:
        taken.close()


def test_unknown_run_as_user_exits_1(lab):
    daemon = lab.daemon(lab.config(listen=f"127.0.0.1:{dl.free_port()}"), user="nosuchuser")
    assert daemon.wait_exit(10) == 1, daemon.log()
