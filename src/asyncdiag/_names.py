"""Every public telemetry name of asyncdiag, in one place.

The code, the docs, the dashboards' tests and the README tables read from here; a name that
is not in this module is not emitted. See ``../shared/DESIGN.md`` ("Telemetry names").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

INSTRUMENTATION_SCOPE = "asyncdiag"

# Finding kinds (stable strings of the contract).
SLOW_CALLBACK = "slow_callback"
LOOP_BLOCKED = "loop_blocked"
ORPHANED_ASYNCGEN = "orphaned_asyncgen"
SWALLOWED_EXCEPTION = "swallowed_exception"
SWALLOWED_CANCELLATION = "swallowed_cancellation"
SLOW_TEARDOWN = "slow_teardown"
NEVER_AWAITED = "never_awaited"
UNRETRIEVED_EXCEPTION = "unretrieved_exception"
PENDING_TASK_DESTROYED = "pending_task_destroyed"

FINDING_KINDS: tuple[str, ...] = (
    SLOW_CALLBACK,
    LOOP_BLOCKED,
    ORPHANED_ASYNCGEN,
    SWALLOWED_EXCEPTION,
    SWALLOWED_CANCELLATION,
    SLOW_TEARDOWN,
    NEVER_AWAITED,
    UNRETRIEVED_EXCEPTION,
    PENDING_TASK_DESTROYED,
)

# Span names: f"{SPAN_ASYNC_WITH} {qualname}", f"{SPAN_ASYNC_FOR} {qualname}".
SPAN_ASYNC_WITH = "async with"
SPAN_ASYNC_FOR = "async for"


def async_with_span_name(qualname: str) -> str:
    return f"{SPAN_ASYNC_WITH} {qualname}"


def async_for_span_name(qualname: str) -> str:
    return f"{SPAN_ASYNC_FOR} {qualname}"


# Attribute keys.
ATTR_SUBJECT = "asyncdiag.subject"
ATTR_OUTCOME = "asyncdiag.outcome"
ATTR_KIND = "kind"

Outcome = Literal["ok", "error", "suppressed", "cancelled"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "error", "suppressed", "cancelled")

# Span event for a finding, and its attribute keys. Only code names, locations and the
# detector's sentence: never argument values, task names or stacks.
FINDING_EVENT = "asyncdiag.finding"
EVENT_ATTR_KIND = "asyncdiag.finding.kind"
EVENT_ATTR_SUBJECT = ATTR_SUBJECT
EVENT_ATTR_MESSAGE = "asyncdiag.finding.message"
EVENT_ATTR_LOCATION = "asyncdiag.finding.location"
EVENT_ATTR_DURATION = "asyncdiag.finding.duration"
FINDING_EVENT_ATTRIBUTES: tuple[str, ...] = (
    EVENT_ATTR_KIND, EVENT_ATTR_SUBJECT, EVENT_ATTR_MESSAGE, EVENT_ATTR_LOCATION,
    EVENT_ATTR_DURATION,
)

InstrumentKind = Literal["histogram", "counter", "up_down_counter", "observable_gauge"]


@dataclass(frozen=True)
class MetricName:
    name: str
    instrument: InstrumentKind
    unit: str
    description: str
    attributes: tuple[str, ...] = ()

    @property
    def prometheus_base(self) -> str:
        """The metric's name as the OTel Prometheus exporter exposes it (before suffixes)."""
        base = self.name.replace(".", "_")
        if self.unit == "s":
            base += "_seconds"
        return base

    @property
    def prometheus_series(self) -> tuple[str, ...]:
        """Every series name Prometheus shows for this metric."""
        base = self.prometheus_base
        if self.instrument == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        if self.instrument == "counter":
            return (f"{base}_total",)
        return (base,)


CONTEXT_ENTER_DURATION = MetricName(
    "asyncdiag.context.enter.duration", "histogram", "s",
    "Time spent in __aenter__ of an instrumented async context manager", (ATTR_SUBJECT,),
)
CONTEXT_EXIT_DURATION = MetricName(
    "asyncdiag.context.exit.duration", "histogram", "s",
    "Time spent in __aexit__ of an instrumented async context manager",
    (ATTR_SUBJECT, ATTR_OUTCOME),
)
ITERATOR_NEXT_DURATION = MetricName(
    "asyncdiag.iterator.next.duration", "histogram", "s",
    "Time spent in __anext__ of an instrumented async iterator or generator", (ATTR_SUBJECT,),
)
ITERATOR_YIELDS = MetricName(
    "asyncdiag.iterator.yields", "counter", "{item}",
    "Items yielded by instrumented async iterators and generators", (ATTR_SUBJECT,),
)
ASYNCGEN_ACTIVE = MetricName(
    "asyncdiag.asyncgen.active", "up_down_counter", "{generator}",
    "Async generators started and not yet finished, closed or collected",
)
LOOP_LAG = MetricName(
    "asyncdiag.loop.lag", "histogram", "s",
    "Delay between when a heartbeat callback was due and when the loop ran it",
)
LOOP_SLOW_CALLBACK_DURATION = MetricName(
    "asyncdiag.loop.slow_callback.duration", "histogram", "s",
    "Duration of loop steps that ran longer than slow_callback_duration",
)
LOOP_TASKS = MetricName(
    "asyncdiag.loop.tasks", "observable_gauge", "{task}",
    "Tasks not yet done, per monitored event loop",
)
FINDINGS = MetricName(
    "asyncdiag.findings", "counter", "{finding}",
    "Findings reported by asyncdiag, by kind", (ATTR_KIND,),
)

METRICS: tuple[MetricName, ...] = (
    CONTEXT_ENTER_DURATION,
    CONTEXT_EXIT_DURATION,
    ITERATOR_NEXT_DURATION,
    ITERATOR_YIELDS,
    ASYNCGEN_ACTIVE,
    LOOP_LAG,
    LOOP_SLOW_CALLBACK_DURATION,
    LOOP_TASKS,
    FINDINGS,
)

# Explicit histogram boundaries in seconds: 10 µs .. 10 s, roughly 1-2.5-5 per decade. The
# SDK's defaults (0, 5, 10, ... 10000) assume milliseconds and would put every async latency
# in the first bucket.
DURATION_BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005,
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0,
)
