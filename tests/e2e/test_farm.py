"""A farm of two on one PostgreSQL quota store, end to end.

Two private Postfix instances (two slots, one sink), each with its own restrictpd behind
pickup's content_filter, both restrictpd instances on one private PostgreSQL cluster with the
same `scope` and `arbitrary 3 per day` for www-data. Mail from www-data to strangers through
both hosts reaches exactly 3 of them in all; the rest is deferred (451 4.7.1) and stays queued.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pgcluster  # noqa: E402

pytestmark = pytest.mark.needs_restrictpd

WWW = "www-data"
RULES = ("user www-data\n    allow webmaster@example.org\n    arbitrary 3 per day\n\n" + harness.STANDARD_RULES.split("\n\n", 1)[1])


@pytest.fixture
def cluster():
    c = pgcluster.Cluster().init()
    try:
        yield c
    finally:
        c.destroy()


@pytest.fixture
def second_postfix(sink, e2e_environment):
    slot = harness.Slot.acquire()
    try:
        with harness.running_postfix(slot, sink.port) as pf:
            try:
                yield pf
            finally:
                pf.purge()
    finally:
        slot.release()


def farm_config(postfix, cluster, workdir: Path) -> str:
    store = (f"state {cluster.uri}\nstate_password_file {cluster.password_file}\n"
             f"scope e2e-farm\n")
    text = harness.restrictpd_config(port=postfix.filter_port, relay_port=postfix.relay_port,
                                     state=workdir / "unused.db", rules=RULES)
    return re.sub(r"^state .*\n", store, text, flags=re.M)


def deferred(postfix, since: int) -> set[str]:
    rx = re.compile(r"to=<(stranger\d+@example\.com)>.*dsn=4\.7\.1, status=deferred")
    return {m.group(1) for line in postfix.log_lines(since) if (m := rx.search(line))}


def test_farm_of_two_shares_one_budget(postfix, second_postfix, sink, cluster, restrictpd_binary, tmp_path):
    hosts = [postfix, second_postfix]
    daemons = []
    for n, pf in enumerate(hosts):
        workdir = tmp_path / f"node{n}"
        workdir.mkdir()
        r = harness.Restrictpd(workdir, farm_config(pf, cluster, workdir), pf.filter_port, restrictpd_binary)
        if n == 0:
            init = subprocess.run([str(restrictpd_binary), "--config", str(r.config), "--init-store"],
                                  capture_output=True, text=True, timeout=30)
            assert init.returncode == 0, init.stderr
        daemons.append(r.start())
    try:
        marks = [pf.log_mark() for pf in hosts]
        strangers = [f"stranger{i}@example.com" for i in range(8)]
        for i, rcpt in enumerate(strangers):
            msg, _ = harness.make_message(sender=f"{WWW}@lab.localdomain", to=[rcpt],
                                          subject=f"farm {i}", body="one budget\n")
            hosts[i % 2].sendmail([rcpt], msg, user=WWW)

        def settled():
            delivered = {r for m in sink.messages() for r in m.rcpts if r in strangers}
            waiting = set().union(*(deferred(pf, mark) for pf, mark in zip(hosts, marks)))
            return (delivered, waiting) if len(delivered | waiting) >= len(strangers) else None

        harness.wait_until(settled, 60, 0.2, "every stranger delivered or deferred")
        time.sleep(3)
        delivered = [r for m in sink.messages() for r in m.rcpts if r in strangers]
        assert len(delivered) == 3, f"exactly 3 strangers in all, got {sorted(delivered)}"
        by_host = [sum(1 for line in r.log_text().splitlines() if "verdict=relayed" in line) for r in daemons]
        assert sum(by_host) == 3
        assert sum(len(pf.queue()) for pf in hosts) == 5
        # Repeats are free on the other host too: a counted address goes through either door.
        first = delivered[0]
        for pf in hosts:
            msg, _ = harness.make_message(sender=f"{WWW}@lab.localdomain", to=[first],
                                          subject="farm again", body="free\n")
            pf.sendmail([first], msg, user=WWW)
        sink.wait_for(5, 40)
    finally:
        for r in daemons:
            r.stop()
