"""Root pytest configuration for every Python test of restrictpd: the shared library
(tests/lib) is importable from each test directory, whichever directory pytest is given."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
