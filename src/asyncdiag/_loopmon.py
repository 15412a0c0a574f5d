"""Loop health: slow steps with the guilty line, a loop-blocked watchdog, lag, task counts, and
asyncio's own warnings as findings.

The mechanics live in ``_watchdog`` (heartbeat + stack sampling from one thread per process)
and ``_asyncio_warnings`` (never-awaited hook, exception-handler chain, debug-log filter); this
component wires them to the agent: it learns about loops from ``agent.loops``, records metrics
through ``agent.telemetry`` and undoes everything on stop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import _findings, _names, _safety, _watchdog
from ._asyncio_warnings import AsyncioWarnings, subject_of

if TYPE_CHECKING:
    from ._lifecycle import Agent


class LoopMonitor:
    name = "loop monitor"

    def __init__(self) -> None:
        self._agent: Agent | None = None
        self.watchdog: _watchdog.Watchdog | None = None
        self._warnings: AsyncioWarnings | None = None

    # -- component ----------------------------------------------------------------------------
    def start(self, agent: Agent) -> None:
        self._agent = agent
        config = agent.config
        telemetry = agent.telemetry
        settings = _watchdog.Settings(
            slow_callback_duration=config.slow_callback_duration,
            blocked_threshold=config.blocked_threshold,
            record_lag=_safety.guard("loop lag metric", None)(telemetry.record_loop_lag),
            record_slow=_safety.guard("slow callback metric", None)(
                telemetry.record_slow_callback
            ),
        )
        self.watchdog = _watchdog.Watchdog(settings, per_loop=self._check_loop)
        _watchdog.set_current(self.watchdog)
        self.watchdog.start()
        self._warnings = AsyncioWarnings(self._exact_slow_step if config.debug else None)
        self._warnings.start(debug=config.debug)
        telemetry.add_task_count_source(self._task_counts)
        agent.loops.subscribe(on_loop=self._on_loop, on_run=self._on_run)

    def stop(self) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.loops.unsubscribe(on_loop=self._on_loop, on_run=self._on_run)
            agent.telemetry.remove_task_count_source(self._task_counts)
        if self.watchdog is not None:
            self.watchdog.stop()
            _watchdog.set_current(None)
        if self._warnings is not None:
            self._warnings.stop()
            self._warnings = None

    # -- loops --------------------------------------------------------------------------------
    def _on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._warnings is not None:
            self._warnings.ensure_handler(loop)

    def _on_run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Inside the loop thread, at the start of a run."""
        if self.watchdog is None:
            return
        state = self.watchdog.watch(loop, threading.get_ident())
        state.prime(loop)
        if self._warnings is not None:
            self._warnings.ensure_handler(loop)

    def _check_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """From the watchdog, now and then: an application that set its own exception
        handler after start-up gets it wrapped too."""
        if self._warnings is not None:
            self._warnings.ensure_handler(loop)

    def _task_counts(self) -> Iterable[tuple[int, dict[str, str]]]:
        if self.watchdog is None:
            return []
        total = 0
        for state in self.watchdog.states():
            loop = state.loop_ref()
            if loop is None or loop.is_closed():
                continue
            total += _count_tasks(loop)
        return [(total, {})]

    # -- debug mode -----------------------------------------------------------------------------
    def _exact_slow_step(
        self, loop: asyncio.AbstractEventLoop | None, seconds: float, description: str
    ) -> None:
        """asyncio's debug mode timed a slow step. Hand it to the watchdog, whose finding has
        the blocking line; a loop we do not watch gets a finding of its own."""
        state = self.watchdog.state_for(loop) if self.watchdog and loop is not None else None
        if state is not None:
            state.exact.append((_watchdog.monotonic(), seconds, description))
            return
        _findings.report(
            _names.SLOW_CALLBACK,
            f"asyncio debug mode: Executing {description} took {seconds:.3f} s",
            subject_of(description), duration=seconds,
        )


def _count_tasks(loop: asyncio.AbstractEventLoop) -> int:
    """Pending tasks of ``loop``, from the metrics thread. The task registry may change size
    while it is read from another thread; asyncio itself retries in that case, and so do we."""
    for _ in range(10):
        try:
            return len(asyncio.all_tasks(loop))
        except RuntimeError:
            continue
    return 0
