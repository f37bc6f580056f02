"""restrictpd --audit's fix texts name files where the package installs them: the examples
of etc/postfix/ and etc/nftables/ under SystemAudit.examples (debian/restrictpd.install),
never the source tree's etc/ paths, which do not exist on an installed system."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADMIN = ROOT / "Sources" / "RestrictDaemon" / "Admin"
SOURCE_PATH = re.compile(r"(?<![/\w])etc/(postfix|nftables)/")
EXAMPLE_PATH = re.compile(r"\\\((?:SystemAudit\.)?examples\)/([\w./-]+)")


def code_lines():
    """(file name, line number, line) of the audit's Swift sources, comment lines left out."""
    for path in sorted(ADMIN.glob("Audit*.swift")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip().startswith("//"):
                yield path.name, number, line


def examples_constant() -> str:
    text = (ADMIN / "AuditSystem.swift").read_text()
    m = re.search(r'static let examples = "([^"]+)"', text)
    assert m, "SystemAudit.examples is missing"
    return m.group(1)


def test_examples_are_where_the_package_installs_them():
    installed = {}
    for line in (ROOT / "debian" / "restrictpd.install").read_text().splitlines():
        fields = line.split()
        if len(fields) == 2:
            installed[fields[0]] = "/" + fields[1].rstrip("/")
    for source in ("etc/postfix", "etc/nftables"):
        assert installed.get(source) == examples_constant(), f"{source} is installed to {installed.get(source)}"


def test_fix_texts_name_no_source_tree_paths():
    bad = [f"{name}:{number}: {line.strip()}" for name, number, line in code_lines() if SOURCE_PATH.search(line)]
    assert not bad, "\n".join(bad)


def test_named_examples_exist():
    named = {m.group(1) for _, _, line in code_lines() for m in EXAMPLE_PATH.finditer(line)}
    assert named, "no fix text names an example"
    for relative in sorted(named):
        assert (ROOT / "etc" / relative).is_file(), f"{relative}: no etc/{relative} to install"
