"""pytest fixtures for restrictpd's process-level tests (tests/daemon).

`lab`: a fresh world-traversable temporary directory (so `nobody` and `postfix` can reach UNIX
sockets and the state directory in it), a scripted relay on a free loopback port, and factories
for daemons and notify sockets; everything is stopped and removed at teardown. Every test also has
a hard time limit (SIGALRM) on top of the deadline of each individual wait.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

import testlib  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import daemonlib as dl  # noqa: E402

TEST_TIME_LIMIT = int(os.environ.get("RESTRICTPD_DAEMON_TEST_TIMEOUT", "120"))


@pytest.fixture(scope="session", autouse=True)
def _binary():
    if os.geteuid() != 0:
        pytest.skip("the daemon tests run as root (runuser, privilege drop)")
    return dl.wait_for_binary()


@pytest.fixture(autouse=True)
def _time_limit():
    """Abort a test that somehow blocks past every deadline (e.g. a wedged subprocess)."""
    with testlib.time_limit(TEST_TIME_LIMIT):
        yield


class Lab:
    def __init__(self, directory: Path):
        self.dir = directory
        self.relay = dl.Relay()
        self.daemons: list[dl.Daemon] = []
        self.notifiers: list[dl.NotifyListener] = []
        self.cleanups = []

    @property
    def state(self) -> Path:
        return self.dir / "state" / "quota.db"

    def config(self, name: str = "restrictpd.conf", **kw) -> Path:
        kw.setdefault("relay_port", self.relay.port)
        kw.setdefault("state", self.state)
        return dl.write_config(self.dir / name, **kw)

    def daemon(self, config: Path, **kw) -> dl.Daemon:
        d = dl.Daemon(self.dir, config, **kw)
        self.daemons.append(d)
        return d

    def notify(self, on_message=None) -> dl.NotifyListener:
        n = dl.NotifyListener(self.dir, on_message)
        self.notifiers.append(n)
        return n

    def close(self):
        for d in self.daemons:
            d.stop()
        for n in self.notifiers:
            n.close()
        for c in reversed(self.cleanups):
            c()
        self.relay.close()


@pytest.fixture
def lab(request):
    directory = Path(tempfile.mkdtemp(prefix="restrictpd-daemon-", dir="/tmp"))
    os.chmod(directory, 0o755)
    (directory / "state").mkdir()
    os.chmod(directory / "state", 0o777)
    world = Lab(directory)
    try:
        yield world
    finally:
        world.close()
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for d in world.daemons:
                sys.stderr.write(f"\n--- {d.log_path} ---\n{d.log()}\n")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
