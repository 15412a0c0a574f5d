"""The embedded default: a readable summary of the findings on stderr when the program exits.

Printed only with the ``console`` exporter (no OpenTelemetry endpoint configured), so that a
first run with no collector still shows what was found.
"""

from __future__ import annotations

import atexit
import sys
from typing import TYPE_CHECKING

from . import _findings

if TYPE_CHECKING:
    from ._lifecycle import Agent


def print_summary() -> None:
    stream = sys.stderr
    if stream is None:
        return
    try:
        text = _findings.format_summary(
            _findings.STORE.snapshot(), evicted=_findings.STORE.evicted
        )
        stream.write(text)
        stream.flush()
    except Exception:
        pass


class ExitSummary:
    name = "exit summary"

    def __init__(self) -> None:
        self._registered = False

    def start(self, agent: Agent) -> None:
        if agent.config.exporter == "console":
            atexit.register(print_summary)
            self._registered = True

    def stop(self) -> None:
        if self._registered:
            atexit.unregister(print_summary)
            self._registered = False
