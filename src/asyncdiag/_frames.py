"""Which frames are asyncdiag's own machinery, to be skipped when a finding names a line, and
the text of a line recorded on a hot path as ``(code, byte offset)``.

The demo lives inside the package but is a program, not machinery: its frames are the user's.
"""

from __future__ import annotations

import os
from types import CodeType, FrameType

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
PACKAGE_PROGRAMS = frozenset({PACKAGE_DIR + "_demo.py"})


def is_own_machinery(filename: str) -> bool:
    return filename.startswith(PACKAGE_DIR) and filename not in PACKAGE_PROGRAMS


def program_frame(frame: FrameType | None) -> FrameType | None:
    """The first frame, from ``frame`` outwards, that is not asyncdiag's own."""
    while frame is not None and is_own_machinery(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def line_of(code: CodeType, lasti: int) -> int:
    """The source line of the instruction at byte offset ``lasti`` (``frame.f_lineno`` costs
    a line-table walk on every call; this is paid only when a finding is made)."""
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno


# A hot site repeats the same (code, offset): its text is computed once. Bounded: cleared when
# full (code objects are kept alive).
_LOCATION_CACHE_SIZE = 2048
_locations: dict[tuple[CodeType, str, int], str] = {}


def code_location(code: CodeType | None, lasti: int) -> str | None:
    """``file:line`` of the instruction at ``lasti`` in ``code``."""
    if code is None:
        return None
    # Code objects compare equal across files (their equality ignores co_filename): the same
    # module loaded from two directories must not share a cached location.
    key = (code, code.co_filename, lasti)
    text = _locations.get(key)
    if text is None:
        if len(_locations) >= _LOCATION_CACHE_SIZE:
            _locations.clear()
        text = _locations[key] = f"{code.co_filename}:{line_of(code, lasti)}"
    return text
