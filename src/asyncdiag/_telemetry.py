"""OpenTelemetry delivery: tracer, instruments, and the finding sink.

Detectors record through the ``Telemetry`` methods below and never touch the SDK directly,
so that provider setup, aggregation and export policy live in this one module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from . import _names
from ._findings import Finding

if TYPE_CHECKING:
    from ._lifecycle import Agent

logger = logging.getLogger("asyncdiag")

TaskCountSource = Callable[[], Iterable[tuple[int, dict[str, str]]]]


class Telemetry:
    name = "telemetry"

    def __init__(self) -> None:
        self._agent: Agent | None = None
        self.tracer: trace.Tracer = trace.get_tracer(_names.INSTRUMENTATION_SCOPE)
        self._meter: metrics.Meter | None = None
        self._task_sources: list[TaskCountSource] = []
        self._instruments: dict[str, Any] = {}

    # -- component ------------------------------------------------------------------------
    def start(self, agent: Agent) -> None:
        self._agent = agent
        self.tracer = trace.get_tracer(_names.INSTRUMENTATION_SCOPE)
        self._meter = metrics.get_meter(_names.INSTRUMENTATION_SCOPE)
        self._create_instruments(self._meter)
        agent.store.add_sink(self._finding_sink)

    def stop(self) -> None:
        if self._agent is not None:
            self._agent.store.remove_sink(self._finding_sink)
        self._agent = None
        self._task_sources.clear()

    def _create_instruments(self, meter: metrics.Meter) -> None:
        for spec in _names.METRICS:
            if spec.instrument == "histogram":
                self._instruments[spec.name] = meter.create_histogram(
                    spec.name, unit=spec.unit, description=spec.description,
                    explicit_bucket_boundaries_advisory=list(_names.DURATION_BUCKETS),
                )
            elif spec.instrument == "counter":
                self._instruments[spec.name] = meter.create_counter(
                    spec.name, unit=spec.unit, description=spec.description
                )
            elif spec.instrument == "up_down_counter":
                self._instruments[spec.name] = meter.create_up_down_counter(
                    spec.name, unit=spec.unit, description=spec.description
                )
            elif spec.instrument == "observable_gauge":
                self._instruments[spec.name] = meter.create_observable_gauge(
                    spec.name, callbacks=[self._observe_tasks], unit=spec.unit,
                    description=spec.description,
                )

    # -- recording API used by the detectors ------------------------------------------------
    def record_enter(self, subject: str, seconds: float) -> None:
        self._instruments[_names.CONTEXT_ENTER_DURATION.name].record(
            seconds, {_names.ATTR_SUBJECT: subject}
        )

    def record_exit(self, subject: str, outcome: _names.Outcome, seconds: float) -> None:
        self._instruments[_names.CONTEXT_EXIT_DURATION.name].record(
            seconds, {_names.ATTR_SUBJECT: subject, _names.ATTR_OUTCOME: outcome}
        )

    def record_next(self, subject: str, seconds: float) -> None:
        self._instruments[_names.ITERATOR_NEXT_DURATION.name].record(
            seconds, {_names.ATTR_SUBJECT: subject}
        )

    def add_yields(self, subject: str, count: int = 1) -> None:
        self._instruments[_names.ITERATOR_YIELDS.name].add(count, {_names.ATTR_SUBJECT: subject})

    def asyncgen_active(self, delta: int) -> None:
        self._instruments[_names.ASYNCGEN_ACTIVE.name].add(delta)

    def record_loop_lag(self, seconds: float) -> None:
        self._instruments[_names.LOOP_LAG.name].record(seconds)

    def record_slow_callback(self, seconds: float) -> None:
        self._instruments[_names.LOOP_SLOW_CALLBACK_DURATION.name].record(seconds)

    def add_task_count_source(self, source: TaskCountSource) -> None:
        """``source()`` yields ``(pending_task_count, attributes)`` per loop at collection."""
        self._task_sources.append(source)

    def remove_task_count_source(self, source: TaskCountSource) -> None:
        if source in self._task_sources:
            self._task_sources.remove(source)

    def _observe_tasks(self, options: CallbackOptions) -> Iterable[Observation]:
        observations: list[Observation] = []
        for source in list(self._task_sources):
            try:
                observations.extend(Observation(count, attrs) for count, attrs in source())
            except Exception:
                logger.debug("asyncdiag: task count source failed", exc_info=True)
        return observations

    # -- findings ---------------------------------------------------------------------------
    def _finding_sink(self, finding: Finding, span: Any) -> None:
        self._instruments[_names.FINDINGS.name].add(1, {_names.ATTR_KIND: finding.kind})
        target = span if span is not None else trace.get_current_span()
        if target.is_recording():
            attributes: dict[str, str | int | float] = {
                "asyncdiag.kind": finding.kind,
                "asyncdiag.subject": finding.subject,
                "asyncdiag.message": finding.message,
            }
            if finding.location:
                attributes["code.location"] = finding.location
            if finding.duration is not None:
                attributes["asyncdiag.duration"] = finding.duration
            target.add_event(_names.FINDING_EVENT, attributes)
