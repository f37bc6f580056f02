"""debian/postinst points the admin at `restrictpd --audit` and never runs it: the audit
probes as other users and reads Postfix and the firewall, which is the admin's call once
Postfix is wired, not the package's at install time."""

import re
import shlex
from pathlib import Path

POSTINST = Path(__file__).resolve().parents[2] / "debian" / "postinst"


def script_lines() -> list[str]:
    """The script's commands: continuation lines joined, comments and blank lines dropped."""
    text = POSTINST.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_postinst_prints_a_hint_naming_the_audit():
    hints = [line for line in script_lines() if "restrictpd --audit" in line]
    assert hints, "debian/postinst does not mention restrictpd --audit"
    for line in hints:
        words = shlex.split(line)
        assert words[0] in ("echo", "printf"), f"not a printed hint: {line}"
        assert any("restrictpd --audit" in w for w in words[1:]), line


def test_postinst_never_runs_the_audit():
    for line in script_lines():
        words = shlex.split(line, comments=True)
        # Outside quotes, --audit would be an argument of a command being run.
        assert "--audit" not in words, f"runs the audit: {line}"
        # Inside quotes, a command substitution would run it too.
        assert not re.search(r"(\$\(|`)[^)`]*--audit", line), f"runs the audit: {line}"
