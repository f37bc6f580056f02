"""restrictpd --log journal writes structured entries through libsystemd's sd_journal_sendv:
MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, SYSLOG_FACILITY and RESTRICTPD_* fields."""

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("smtp-sink") is None,
                    reason="needs root, unshare and smtp-sink")
def test_decision_is_a_structured_journal_entry():
    out = subprocess.run(["unshare", "-m", sys.executable, os.path.join(HERE, "journal_probe.py")],
                         capture_output=True, timeout=60, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["final"][-1].startswith("250"), result["final"]
    entries = result["entries"]
    assert entries, "no journal entries arrived"
    for e in entries:
        assert e["SYSLOG_IDENTIFIER"] == "restrictpd"
        assert e["SYSLOG_FACILITY"] == "2"  # mail
        assert e["PRIORITY"] in {"3", "4", "5", "6", "7"}
    ready = [e for e in entries if "ready" in e["MESSAGE"]]
    assert ready and ready[0]["PRIORITY"] == "6"
    decisions = [e for e in entries if "verdict=relayed" in e["MESSAGE"]]
    assert len(decisions) == 1, entries
    d = decisions[0]
    assert d["MESSAGE"].startswith("4ABCDEF12: uid=0 user=root door=pickup from=<root@lab.localdomain> to=<alice@example.com>")
    assert d["PRIORITY"] == "6"
    assert d["RESTRICTPD_UID"] == "0"
    assert d["RESTRICTPD_USER"] == "root"
    assert d["RESTRICTPD_QUEUE_ID"] == "4ABCDEF12"
    assert d["RESTRICTPD_VERDICT"] == "relayed"
    assert d["RESTRICTPD_TO"] == "alice@example.com"
    assert d["RESTRICTPD_RELAY"].startswith("250")
