"""Docs are code: every keyword the configuration parser knows appears in the
shipped etc/restrictpd.conf and is documented in man/restrictpd.conf.5
(the idea of Postfix's mantools/check-postconf-undocumented)."""

import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PARSER = ROOT / "Sources" / "RestrictPolicy" / "ConfigParser.swift"
MODEL = ROOT / "Sources" / "RestrictPolicy" / "Configuration.swift"
CONF = ROOT / "etc" / "restrictpd.conf"
MAN = ROOT / "man" / "restrictpd.conf.5"


def parser_keywords():
    src = PARSER.read_text()
    words = set()
    for name in ("globalKeys", "ruleStarts", "ruleKeys"):
        m = re.search(r"static let " + name + r": \[String\] = \[(.*?)\]", src, re.S)
        assert m, f"{name} not found in {PARSER}"
        words |= set(re.findall(r'"([a-z_]+)"', m.group(1)))
    settings = set(re.findall(r'Setting\("([a-z_]+)"', MODEL.read_text()))
    assert settings, "no Setting(...) found"
    return sorted(words | settings)


KEYWORDS = parser_keywords()


def test_keywords_found():
    assert len(KEYWORDS) >= 27
    assert {"listen", "arbitrary", "drain_timeout", "unknown"} <= set(KEYWORDS)


@pytest.mark.parametrize("word", KEYWORDS)
def test_in_example_configuration(word):
    # As a keyword at the start of a line, set or commented out.
    assert re.search(r"^\s*#?\s*" + re.escape(word) + r"\b", CONF.read_text(), re.M), word


@pytest.mark.parametrize("word", KEYWORDS)
def test_in_manual(word):
    assert re.search(r"^\.It Ic " + re.escape(word) + r"\b", MAN.read_text(), re.M), word


@pytest.mark.skipif(not os.environ.get("RESTRICTPD_BIN"), reason="RESTRICTPD_BIN not set (scripts/test sets it)")
def test_example_configuration_is_valid():
    r = subprocess.run([os.environ["RESTRICTPD_BIN"], "--check-config", "--config", str(CONF)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
