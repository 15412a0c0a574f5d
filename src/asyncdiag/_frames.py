"""Which frames are asyncdiag's own machinery, to be skipped when a finding names a line.

The demo lives inside the package but is a program, not machinery: its frames are the user's.
"""

from __future__ import annotations

import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
PACKAGE_PROGRAMS = frozenset({PACKAGE_DIR + "_demo.py"})


def is_own_machinery(filename: str) -> bool:
    return filename.startswith(PACKAGE_DIR) and filename not in PACKAGE_PROGRAMS
