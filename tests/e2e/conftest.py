"""pytest fixtures for restrictpd's end-to-end tests (real Postfix on loopback).

Session: one private Postfix instance (slot under /var/tmp/restrictpd-e2e) and one SMTP sink.
Per test: the queue is purged and the sink emptied before and after; restrictpd instances
started through `restrictpd_factory` are stopped at teardown; every test has a hard time limit
(SIGALRM) on top of the deadlines of each individual wait.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

import testlib  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

TEST_TIME_LIMIT = int(os.environ.get("RESTRICTPD_E2E_TEST_TIMEOUT", "240"))


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_restrictpd: the test runs the restrictpd binary")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(autouse=True)
def _time_limit():
    """Abort a test that somehow blocks past every deadline (e.g. a wedged subprocess)."""
    with testlib.time_limit(TEST_TIME_LIMIT):
        yield


@pytest.fixture(scope="session")
def e2e_environment():
    problem = harness.environment_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def slot(e2e_environment):
    s = harness.Slot.acquire()
    try:
        yield s
    finally:
        s.release()


@pytest.fixture(scope="session")
def sink(slot):
    s = harness.Sink(slot.path / "sink").start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def postfix_instance(slot, sink):
    with harness.running_postfix(slot, sink.port) as pf:
        yield pf


@pytest.fixture
def postfix(postfix_instance, sink, request):
    """The session's Postfix with an empty queue and an empty sink; cleaned again afterwards."""
    postfix_instance.purge()
    sink.clear()
    postfix_instance.test_log_mark = postfix_instance.log_mark()
    try:
        yield postfix_instance
    finally:
        harness.clean_postfix(postfix_instance, sink, postfix_instance.test_log_mark, request)


@pytest.fixture(scope="session")
def restrictpd_binary(e2e_environment, tmp_path_factory):
    """A private copy of the restrictpd binary, taken once per session.

    The daemon may be rebuilt while the suite runs; a copy keeps every test on the same build
    and avoids "Text file busy" / a half-written file. RESTRICTPD_BIN overrides the default
    <repo>/.build/debug/restrictpd."""
    b = harness.restrictpd_binary()
    if not b.exists():
        pytest.skip(f"restrictpd binary {b} not built (swift build --product restrictpd, "
                    "or set RESTRICTPD_BIN)")
    return harness.snapshot_binary(b, tmp_path_factory.mktemp("bin"))


@pytest.fixture
def restrictpd_factory(postfix, restrictpd_binary, tmp_path, request):
    """make(rules=..., relay='hardened'|'debian', extra_globals='', start=True) -> Restrictpd.

    restrictpd listens on the Postfix instance's content-filter port and relays to one of
    its reinjection listeners; state (quota DB) and log live in the test's tmp_path."""
    made: list[harness.Restrictpd] = []

    def make(rules: str = harness.STANDARD_RULES, relay: str = "hardened",
             extra_globals: str = "", start: bool = True, name: str = "rpd") -> harness.Restrictpd:
        relay_port = postfix.relay_port if relay == "hardened" else postfix.relay_port_debian
        workdir = tmp_path / name
        cfg = harness.restrictpd_config(port=postfix.filter_port, relay_port=relay_port,
                                        state=workdir / "quota.db", rules=rules,
                                        extra_globals=extra_globals)
        r = harness.Restrictpd(workdir, cfg, postfix.filter_port, restrictpd_binary)
        made.append(r)
        if start:
            r.start()
        return r

    try:
        yield make
    finally:
        harness.stop_restrictpds(made, request)


@pytest.fixture(scope="session")
def rpdtest_user(e2e_environment):
    """A throw-away local user for the quota tests (created and removed by the suite)."""
    name = "rpdtest"
    created = harness.ensure_user(name)
    try:
        yield name
    finally:
        if created:
            harness.remove_user(name)


_REPORTS: list[str] = []


@pytest.fixture
def record_report():
    """record_report(text): show `text` in the terminal summary (e.g. the smuggling table)."""
    return _REPORTS.append


def pytest_terminal_summary(terminalreporter):
    for text in _REPORTS:
        terminalreporter.write_sep("-", "restrictpd e2e report")
        terminalreporter.write_line(text)
