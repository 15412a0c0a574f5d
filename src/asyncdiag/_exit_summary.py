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


def print_summary(saw_event_loop: bool = True) -> None:
    stream = sys.stderr
    if stream is None:
        return
    try:
        findings = _findings.STORE.snapshot()
        if not findings and not saw_event_loop:
            # e.g. pip or a build step started under `asyncdiag run`: nothing async happened,
            # so say nothing rather than add a line to every child process's output.
            return
        text = _findings.format_summary(findings, evicted=_findings.STORE.evicted)
        stream.write(text)
        stream.flush()
    except Exception:
        pass


class ExitSummary:
    name = "exit summary"

    def __init__(self) -> None:
        self._agent: Agent | None = None

    def start(self, agent: Agent) -> None:
        if agent.config.exporter == "console":
            self._agent = agent
            atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        agent = self._agent
        watchdog = getattr(agent.component("loop monitor"), "watchdog", None) if agent else None
        if watchdog is not None:
            # The program's last slow step may end just before exit: let it be judged.
            watchdog.settle(thorough=True)
        print_summary(saw_event_loop=agent is not None and agent.loops.seen_any)

    def stop(self) -> None:
        if self._agent is not None:
            atexit.unregister(self._at_exit)
            self._agent = None
