"""OpenTelemetry delivery: tracer, cheap in-process aggregation, and the finding sink.

Detectors record through the ``Telemetry`` methods below and never touch the SDK directly,
so that provider choice, aggregation and export policy live here (and in ``_otel_pipeline``).

Why the metrics are aggregated here and not by the SDK: ``record_enter``/``record_exit``/
``record_next``/``add_yields`` run on the event loop thread for every instrumented ``async
with`` and every yielded item. One SDK ``Histogram.record`` costs several microseconds
(measurement object, exemplar filter, per-reader storage lookups, locks), more than the
whole per-operation budget. Even a Python-level bucket update (a call, a bisect, four list
stores: about 0.7 us) is too much for a budget of 2 us per ``async with`` that also has to pay
for clock reads and the wrapper coroutines. So a record is one ``list.append`` of the raw
duration onto its series; every ``FOLD_AT`` values, and at each collection, the series is
folded into its point in one batch done in C (sort, one bisect per bucket bound, sum). The SDK
gets the result at collection time, on the collecting thread:

* counters and the up-down counter are *observable* instruments whose callbacks read the
  plain-Python totals (public API, works with any MeterProvider, including the API's proxy
  when the application sets its provider after asyncdiag started);
* histograms have no observable form in the OpenTelemetry API. The SDK does not implement
  the specification's ``MetricProducer`` either, so asyncdiag plays that role itself: it
  wraps each SDK ``MetricReader``'s ``_receive_metrics`` (the SDK's documented override
  point, called with every collection) and appends its own pre-aggregated explicit-bucket
  histogram points, honouring the reader's temporality. The wrappers are removed on
  uninstall. For a MeterProvider that is not the SDK's (no readers to hook) the histograms
  fall back to recording directly into SDK/API histograms: correct but slower.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import weakref
from bisect import bisect_right
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from time import perf_counter, time_ns
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from . import _names, _safety
from ._findings import Finding
from ._patching import Patcher

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, MetricsData

    from ._lifecycle import Agent
    from ._otel_pipeline import Pipeline

logger = logging.getLogger("asyncdiag")

TaskCountSource = Callable[[], Iterable[tuple[int, dict[str, str]]]]
AttributeValue = str | bool | int | float

# Bound on distinct attribute sets per metric (the SDK's default cardinality limit). Beyond it,
# measurements go to one overflow point, as the SDK does, so memory stays bounded whatever
# subjects the program creates.
MAX_POINTS_PER_METRIC = 2000
_OVERFLOW_ATTRIBUTES: Mapping[str, AttributeValue] = {"otel.metric.overflow": True}
_OVERFLOW_KEY: Hashable = ("otel.metric.overflow",)

# Layout of one histogram point: bucket counts (len(bounds) + 1), then sum, min, max. A flat
# list keeps the hot path to index stores on one object.
_BOUNDS: tuple[float, ...] = _names.DURATION_BUCKETS
_NBUCKETS = len(_BOUNDS) + 1
_SUM = _NBUCKETS
_MIN = _NBUCKETS + 1
_MAX = _NBUCKETS + 2
# Items yielded, counted by ``record_item`` on the iterator's next-duration point (one lookup
# for both metrics); added to ``asyncdiag.iterator.yields`` at collection.
_ITEMS = _NBUCKETS + 3

# Total time uninstall/exit may spend flushing telemetry, so that a container stops promptly
# even when the collector hangs.
SHUTDOWN_TIMEOUT_SECONDS = 3.0


def _new_point() -> list[float]:
    return [0] * _NBUCKETS + [0.0, math.inf, -math.inf, 0]


# Raw durations a series holds before it is folded into its point: big enough that the fold's
# fixed cost (a lock, a slice, one bisect per bound) is spread thin, small enough that memory
# stays a few kB per attribute set whatever the rate.
FOLD_AT = 256


class Series(list[float]):
    """Durations recorded for one attribute set of one histogram, not yet folded.

    The hot path appends to it and, when ``len(series) >= series.limit``, calls
    ``series.histogram.fold(series)``. ``limit`` is 1 when the histogram forwards every value
    to an instrument of a non-SDK MeterProvider (nothing collects on its behalf there).
    """

    __slots__ = ("attributes", "histogram", "limit", "point")

    def __init__(self, histogram: _Histogram, point: list[float],
                 attributes: Mapping[str, AttributeValue], limit: int) -> None:
        super().__init__()
        self.histogram = histogram
        self.point = point
        self.attributes = attributes
        self.limit = limit


def _record_since_python(series: Series, t0: float) -> float:
    """Append ``perf_counter() - t0`` to ``series`` (folding it when full); the duration."""
    duration = perf_counter() - t0
    series.append(duration)
    if len(series) >= series.limit:
        series.histogram.fold(series)
    return duration


def _fold_into_python(point: list[float], values: list[float], bounds: tuple[float, ...],
                      ) -> None:
    """Add ``values`` to ``point`` (``len(bounds) + 1`` bucket counts, then sum, min, max):
    buckets are upper-inclusive, as OpenTelemetry's explicit buckets are (value v goes to the
    first bucket whose bound is >= v)."""
    values.sort()
    below = 0
    for index, bound in enumerate(bounds):
        upto = bisect_right(values, bound, below)
        if upto != below:
            point[index] += upto - below
            below = upto
    last = len(bounds)
    if below != len(values):
        point[last] += len(values) - below
    point[last + 1] += sum(values)
    if values[0] < point[last + 2]:
        point[last + 2] = values[0]
    if values[-1] > point[last + 3]:
        point[last + 3] = values[-1]


# In C when the extension is built, else the two functions above:
# * record_since, the instrumentation's step after every awaited __aenter__/__aexit__ and timed
#   item (one call instead of five Python operations, about 330 instructions less per
#   duration on 3.11);
# * _fold_into, which every series' values go through when it fills up (every 256 durations;
#   no sort, about 900 instructions less per duration on 3.11).
record_since: Callable[[Series, float], float]
_fold_into: Callable[[list[float], list[float], tuple[float, ...]], None]
try:
    from ._speedups import fold_into as _fold_into_c
    from ._speedups import record_since as _record_since_c
except ImportError:  # built without a C compiler
    record_since, _fold_into = _record_since_python, _fold_into_python
else:
    record_since, _fold_into = _record_since_c, _fold_into_c


class _Histogram:
    """One duration histogram, aggregated in plain Python per attribute set.

    Values arrive in a ``Series`` per attribute set and are folded into that set's point under
    the lock, by whichever thread finds the series full or collects. Taking the values out of
    a series is one slice and one ``del`` of that many from its head, so appends by other
    threads in between are kept for the next fold.
    """

    __slots__ = ("_lock", "attributes", "limit", "points", "series", "sink", "spec",
                 "start_ns")

    def __init__(self, spec: _names.MetricName) -> None:
        self.spec = spec
        self.points: dict[Hashable, list[float]] = {}
        self.attributes: dict[Hashable, Mapping[str, AttributeValue]] = {}
        self.series: dict[Hashable, Series] = {}
        self.limit = FOLD_AT
        # Set for a non-SDK MeterProvider: every value goes to its instrument instead.
        self.sink: Callable[[float, Mapping[str, AttributeValue]], None] | None = None
        self.start_ns = time_ns()
        self._lock = threading.RLock()

    def series_for(self, key: Hashable, attributes: Mapping[str, AttributeValue]) -> Series:
        """The series for ``key``, created on first use (the slow path of a record)."""
        with self._lock:
            series = self.series.get(key)
            if series is not None:
                return series
            if len(self.points) >= MAX_POINTS_PER_METRIC:
                # Not remembered under ``key``: the table must stay bounded too.
                series = self.series.get(_OVERFLOW_KEY)
                if series is not None:
                    return series
                key, attributes = _OVERFLOW_KEY, _OVERFLOW_ATTRIBUTES
            point = _new_point()
            attributes = dict(attributes)
            self.attributes[key] = attributes
            self.points[key] = point
            series = Series(self, point, attributes, self.limit)
            self.series[key] = series
            return series

    def record(self, key: Hashable, attributes: Mapping[str, AttributeValue],
               seconds: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series_for(key, attributes)
        series.append(seconds)
        if len(series) >= series.limit:
            self.fold(series)

    def fold(self, series: Series) -> None:
        with self._lock:
            self._fold_locked(series)

    def _fold_locked(self, series: Series) -> None:
        count = len(series)
        if not count:
            return
        values = series[:count]
        del series[:count]
        sink = self.sink
        if sink is None:
            _fold_into(series.point, values, _BOUNDS)
        else:
            attributes = series.attributes
            for value in values:
                sink(value, attributes)

    def fold_all(self) -> None:
        with self._lock:
            for series in self.series.values():
                self._fold_locked(series)

    def forward_to(self, sink: Callable[[float, Mapping[str, AttributeValue]], None] | None,
                   ) -> None:
        """Send every value to ``sink`` as it is recorded (None: aggregate again). Values
        still held are delivered first, where they were meant to go."""
        with self._lock:
            self.fold_all()
            self.sink = sink
            self.limit = 1 if sink is not None else FOLD_AT
            for series in self.series.values():
                series.limit = self.limit

    def snapshot(self) -> list[tuple[Hashable, Mapping[str, AttributeValue], list[float]]]:
        with self._lock:
            self.fold_all()
            return [(key, self.attributes[key], list(point))
                    for key, point in self.points.items()]

    def clear(self) -> None:
        with self._lock:
            self.points.clear()
            self.attributes.clear()
            self.series.clear()
            self.start_ns = time_ns()


class _Counts:
    """Monotonic or up-down totals per attribute set, read by an observable instrument."""

    __slots__ = ("_lock", "attributes", "totals")

    def __init__(self) -> None:
        self.totals: dict[Hashable, int] = {}
        self.attributes: dict[Hashable, Mapping[str, AttributeValue]] = {}
        self._lock = threading.RLock()

    def add_new(self, key: Hashable, attributes: Mapping[str, AttributeValue], n: int) -> None:
        with self._lock:
            if key not in self.totals and len(self.totals) >= MAX_POINTS_PER_METRIC:
                key, attributes = _OVERFLOW_KEY, _OVERFLOW_ATTRIBUTES
            if key in self.totals:
                self.totals[key] += n
            else:
                self.attributes[key] = dict(attributes)
                self.totals[key] = n

    def observations(self) -> list[Observation]:
        with self._lock:
            return [Observation(total, self.attributes[key]) for key, total in
                    self.totals.items()]

    def clear(self) -> None:
        with self._lock:
            self.totals.clear()
            self.attributes.clear()


# -- the installed Telemetry, for callbacks that outlive one install ---------------------------
# Observable instruments cannot be removed from a MeterProvider, and the SDK hands back the
# first instrument (with its first callbacks) when one with the same name is created again.
# So instruments are made once per provider and their callbacks read whichever Telemetry is
# installed now; after uninstall they observe nothing.
_active: Telemetry | None = None
_instruments_by_provider: weakref.WeakKeyDictionary[Any, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)
_instruments_lock = threading.Lock()


def _callback(name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        telemetry = _active
        if telemetry is None or _safety.is_disabled(f"metric callback {name}"):
            return ()
        try:
            return telemetry._observe(name)
        except Exception as exc:
            _safety.hook_failed(f"metric callback {name}", exc)
            return ()

    observe.__qualname__ = f"asyncdiag_observe[{name}]"
    return observe


def _observable_instruments(provider: metrics.MeterProvider) -> dict[str, Any]:
    """The observable instruments on ``provider`` (made once per provider)."""
    with _instruments_lock:
        try:
            made = _instruments_by_provider.get(provider)
        except TypeError:  # a provider that cannot be weakly referenced
            made = None
        if made is not None:
            return made
        from . import __version__

        meter = provider.get_meter(_names.INSTRUMENTATION_SCOPE, __version__)
        made = {}
        for spec in _names.METRICS:
            callbacks = [_callback(spec.name)]
            if spec.instrument == "counter":
                made[spec.name] = meter.create_observable_counter(
                    spec.name, callbacks=callbacks, unit=spec.unit,
                    description=spec.description,
                )
            elif spec.instrument == "up_down_counter":
                made[spec.name] = meter.create_observable_up_down_counter(
                    spec.name, callbacks=callbacks, unit=spec.unit,
                    description=spec.description,
                )
            elif spec.instrument == "observable_gauge":
                made[spec.name] = meter.create_observable_gauge(
                    spec.name, callbacks=callbacks, unit=spec.unit,
                    description=spec.description,
                )
        try:
            _instruments_by_provider[provider] = made
        except TypeError:
            pass
        return made


def _is_api_default(provider: object) -> bool:
    """True for the API's proxy/no-op providers, i.e. "the application set none"."""
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider

    try:
        from opentelemetry.metrics._internal import _ProxyMeterProvider
    except ImportError:  # pragma: no cover - layout of the API package changed
        _ProxyMeterProvider = ()  # type: ignore[assignment,misc]
    return isinstance(
        provider, (ProxyTracerProvider, NoOpTracerProvider, NoOpMeterProvider,
                   _ProxyMeterProvider)
    )


def _sdk_readers(provider: object) -> list[Any] | None:
    """The SDK MetricReaders of ``provider``, or None if it is not an SDK MeterProvider."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    except ImportError:  # pragma: no cover - the SDK is a dependency
        return None
    if not isinstance(provider, SdkMeterProvider):
        return None
    consumer = getattr(provider, "_measurement_consumer", None)
    storages = getattr(consumer, "_reader_storages", None)
    if storages is not None:
        return list(storages)
    readers = getattr(provider, "_metric_readers", None)
    return list(readers) if readers is not None else None


# -- explicit providers, handed over by the OpenTelemetry instrumentor -------------------------
_explicit: dict[str, Any] = {}


def use_providers(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Make the next ``install()`` use these providers (``BaseInstrumentor`` kwargs)."""
    _explicit.clear()
    if tracer_provider is not None:
        _explicit["tracer_provider"] = tracer_provider
    if meter_provider is not None:
        _explicit["meter_provider"] = meter_provider


class _ReceiveHook:
    """Replaces one reader's ``_receive_metrics``: appends asyncdiag's histograms, then calls
    the reader's own method. Holds the reader and the Telemetry weakly (the reader holds it)."""

    def __init__(self, telemetry: Telemetry, reader: Any, original: Callable[..., Any],
                 resource: Any) -> None:
        self._telemetry = weakref.ref(telemetry)
        self._reader = weakref.ref(reader)
        self._original = original
        self._resource = resource
        self._disabled = False

    def _self_disable(self) -> None:
        self._disabled = True

    def __call__(self, metrics_data: Any, timeout_millis: float = 10_000,
                 **kwargs: Any) -> Any:
        telemetry = self._telemetry()
        reader = self._reader()
        if (not self._disabled and telemetry is not None and reader is not None
                and metrics_data is not None and not _safety.is_disabled("metric producer")):
            try:
                metrics_data = telemetry._merge_histograms(reader, metrics_data,
                                                           self._resource)
            except Exception as exc:
                _safety.hook_failed("metric producer", exc)
        return self._original(metrics_data, timeout_millis=timeout_millis, **kwargs)


class Telemetry:
    name = "telemetry"

    def __init__(self) -> None:
        self._agent: Agent | None = None
        self.tracer: trace.Tracer = trace.get_tracer(_names.INSTRUMENTATION_SCOPE)
        self._task_sources: list[TaskCountSource] = []
        self._lock = threading.RLock()
        self._enter = _Histogram(_names.CONTEXT_ENTER_DURATION)
        self._exit = _Histogram(_names.CONTEXT_EXIT_DURATION)
        self._next = _Histogram(_names.ITERATOR_NEXT_DURATION)
        self._lag = _Histogram(_names.LOOP_LAG)
        self._slow = _Histogram(_names.LOOP_SLOW_CALLBACK_DURATION)
        self._histograms = (self._enter, self._exit, self._next, self._lag, self._slow)
        # Bound once: the hot paths read these attributes instead of walking ``self._enter``.
        self._enter_series = self._enter.series
        self._exit_series = self._exit.series
        self._next_series = self._next.series
        self._yields = _Counts()
        self._yield_totals = self._yields.totals
        self._findings = _Counts()
        self._asyncgen_active = 0
        self._asyncgen_refresher: Callable[[], None] | None = None
        self._meter_provider: Any = None
        self._patcher = Patcher()
        self._hooked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._late_binding = False
        self._bound_provider: Any = None
        self._unsupported_logged = False
        self._delta_state: weakref.WeakKeyDictionary[
            Any, dict[tuple[str, Hashable], tuple[list[float], int]]
        ] = weakref.WeakKeyDictionary()
        self._pipeline: Pipeline | None = None
        self._atexit_registered = False

    # -- component ------------------------------------------------------------------------
    def start(self, agent: Agent) -> None:
        global _active
        self._agent = agent
        explicit = dict(_explicit)
        _explicit.clear()
        tracer_provider = explicit.get("tracer_provider")
        meter_provider = explicit.get("meter_provider")
        if tracer_provider is None and not _is_api_default(trace.get_tracer_provider()):
            tracer_provider = trace.get_tracer_provider()
        if meter_provider is None and not _is_api_default(metrics.get_meter_provider()):
            meter_provider = metrics.get_meter_provider()
        if tracer_provider is None or meter_provider is None:
            from . import _otel_pipeline

            pipeline = _otel_pipeline.build(
                agent.config.exporter,
                traces=tracer_provider is None,
                metrics=meter_provider is None,
            )
            if pipeline.has_providers:
                self._pipeline = pipeline
                # Flushed at exit within SHUTDOWN_TIMEOUT_SECONDS (the SDK's own at-exit
                # shutdown is off: it can wait 30 s per provider on a hung collector).
                atexit.register(self._shutdown_pipeline)
                self._atexit_registered = True
                tracer_provider = tracer_provider or pipeline.tracer_provider
                meter_provider = meter_provider or pipeline.meter_provider
            else:
                pipeline.shutdown(SHUTDOWN_TIMEOUT_SECONDS)  # a Prometheus port, if any
        # No provider of our own and none from the application: go through the API's proxies,
        # so that a provider the application sets later still receives asyncdiag's telemetry.
        if tracer_provider is None:
            tracer_provider = trace.get_tracer_provider()
        if meter_provider is None:
            meter_provider = metrics.get_meter_provider()
            self._late_binding = _is_api_default(meter_provider)

        from . import __version__

        self.tracer = tracer_provider.get_tracer(_names.INSTRUMENTATION_SCOPE, __version__)
        self._meter_provider = meter_provider
        _observable_instruments(meter_provider)
        if not self._late_binding:
            self._bind_histograms(meter_provider)
        _active = self
        agent.store.add_sink(self._finding_sink)

    def stop(self) -> None:
        global _active
        if self._agent is not None:
            self._agent.store.remove_sink(self._finding_sink)
        self._agent = None
        if self._atexit_registered:
            atexit.unregister(self._shutdown_pipeline)
            self._atexit_registered = False
        # Our own providers get their final collection while the hooks and callbacks are live.
        self._shutdown_pipeline()
        if _active is self:
            _active = None
        self._task_sources.clear()
        self._asyncgen_refresher = None
        with self._lock:
            self._patcher.restore_all()
            self._hooked = weakref.WeakSet()
            self._bound_provider = None
        for histogram in self._histograms:
            if histogram.sink is not None:
                histogram.forward_to(None)
        self.tracer = trace.get_tracer(_names.INSTRUMENTATION_SCOPE)

    def _shutdown_pipeline(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.shutdown(SHUTDOWN_TIMEOUT_SECONDS)

    @property
    def dropped_spans(self) -> int:
        """Spans dropped because the export queue was full (asyncdiag's own pipeline only)."""
        pipeline = self._pipeline
        return pipeline.dropped_spans if pipeline is not None else 0

    # -- recording API used by the detectors (hot paths: keep them to a few stores) ----------
    # The instrumentation keeps the series of each subject it measures (``enter_series``...)
    # and appends to them itself; these methods are the general path (one dict lookup more).
    def enter_series(self, subject: str) -> Series:
        return self._enter.series_for(subject, {_names.ATTR_SUBJECT: subject})

    def exit_series(self, subject: str, outcome: _names.Outcome) -> Series:
        return self._exit.series_for(
            (subject, outcome), {_names.ATTR_SUBJECT: subject, _names.ATTR_OUTCOME: outcome}
        )

    def next_series(self, subject: str) -> Series:
        return self._next.series_for(subject, {_names.ATTR_SUBJECT: subject})

    def record_enter(self, subject: str, seconds: float) -> None:
        series = self._enter_series.get(subject)
        if series is None:
            series = self.enter_series(subject)
        series.append(seconds)
        if len(series) >= series.limit:
            self._enter.fold(series)

    def record_exit(self, subject: str, outcome: _names.Outcome, seconds: float) -> None:
        series = self._exit_series.get((subject, outcome))
        if series is None:
            series = self.exit_series(subject, outcome)
        series.append(seconds)
        if len(series) >= series.limit:
            self._exit.fold(series)

    def record_next(self, subject: str, seconds: float) -> None:
        series = self._next_series.get(subject)
        if series is None:
            series = self.next_series(subject)
        series.append(seconds)
        if len(series) >= series.limit:
            self._next.fold(series)

    def record_item(self, subject: str, seconds: float) -> None:
        """One ``__anext__`` that produced an item: ``record_next(subject, seconds)`` plus
        ``add_yields(subject, 1)`` for the price of one lookup."""
        series = self._next_series.get(subject)
        if series is None:
            series = self.next_series(subject)
        series.point[_ITEMS] += 1
        series.append(seconds)
        if len(series) >= series.limit:
            self._next.fold(series)

    def add_yields(self, subject: str, count: int = 1) -> None:
        totals = self._yield_totals
        if subject in totals:
            totals[subject] += count
        else:
            self._yields.add_new(subject, {_names.ATTR_SUBJECT: subject}, count)

    def asyncgen_active(self, delta: int) -> None:
        self._asyncgen_active += delta

    def record_loop_lag(self, seconds: float) -> None:
        self._lag.record(None, {}, seconds)

    def record_slow_callback(self, seconds: float) -> None:
        self._slow.record(None, {}, seconds)

    def add_task_count_source(self, source: TaskCountSource) -> None:
        """``source()`` yields ``(pending_task_count, attributes)`` per loop at collection."""
        self._task_sources.append(source)

    def set_asyncgen_refresher(self, refresher: Callable[[], None] | None) -> None:
        """``refresher()`` runs at each collection, on the collecting thread, right before
        ``asyncdiag.asyncgen.active`` is read: the asyncgen tracker brings its count up to
        date there instead of with a timer on the loop (which a program can observe)."""
        self._asyncgen_refresher = refresher

    def remove_task_count_source(self, source: TaskCountSource) -> None:
        if source in self._task_sources:
            self._task_sources.remove(source)

    # -- collection (runs on the SDK's collecting thread, never on the loop) -----------------
    def _observe(self, name: str) -> Iterable[Observation]:
        if self._late_binding:
            self._bind_late()
        elif name == _names.ASYNCGEN_ACTIVE.name and self._bound_provider is not None:
            # Once per collection: hook readers added since (MeterProvider.add_metric_reader).
            self._bind_histograms(self._bound_provider)
        if name == _names.ITERATOR_YIELDS.name:
            return self._observe_yields()
        if name == _names.FINDINGS.name:
            return self._findings.observations()
        if name == _names.ASYNCGEN_ACTIVE.name:
            refresher = self._asyncgen_refresher
            if refresher is not None and not _safety.is_disabled("asyncgen active refresh"):
                try:
                    refresher()
                except Exception as exc:
                    _safety.hook_failed("asyncgen active refresh", exc)
            # Always one observation: the SDK skips ``_receive_metrics`` for a collection with
            # no data at all, and the histograms ride on that call.
            return [Observation(self._asyncgen_active)]
        if name == _names.LOOP_TASKS.name:
            return self._observe_tasks()
        return ()

    def _observe_yields(self) -> list[Observation]:
        """``add_yields`` totals plus the items counted by ``record_item``, per subject."""
        totals: dict[Hashable, int] = {}
        attributes: dict[Hashable, Mapping[str, AttributeValue]] = {}
        for key, attrs, point in self._next.snapshot():
            if point[_ITEMS]:
                totals[key] = int(point[_ITEMS])
                attributes[key] = attrs
        with self._yields._lock:
            for key, total in self._yields.totals.items():
                totals[key] = totals.get(key, 0) + total
                attributes.setdefault(key, self._yields.attributes[key])
        return [Observation(total, attributes[key]) for key, total in totals.items()]

    def _observe_tasks(self) -> list[Observation]:
        observations: list[Observation] = []
        for source in list(self._task_sources):
            try:
                observations.extend(Observation(count, attrs) for count, attrs in source())
            except Exception:
                logger.debug("asyncdiag: task count source failed", exc_info=True)
        return observations

    def _bind_late(self) -> None:
        """The API proxy is collecting, so the application has set a real MeterProvider."""
        provider = metrics.get_meter_provider()
        if _is_api_default(provider):
            return
        with self._lock:
            if self._late_binding:
                self._late_binding = False
                self._bind_histograms(provider, late=True)

    def _bind_histograms(self, provider: Any, *, late: bool = False) -> None:
        """Deliver the pre-aggregated histograms to ``provider``'s readers."""
        with self._lock:
            self._bind_histograms_locked(provider, late)

    def _bind_histograms_locked(self, provider: Any, late: bool) -> None:
        readers = _sdk_readers(provider)
        if readers is None:
            if late:
                if not self._unsupported_logged:
                    self._unsupported_logged = True
                    logger.warning(
                        "asyncdiag: the MeterProvider set after asyncdiag started (%s) is not "
                        "the OpenTelemetry SDK's; asyncdiag's duration histograms are not "
                        "exported through it (counters and gauges are)",
                        type(provider).__qualname__,
                    )
                return
            self._record_directly(provider)
            return
        if getattr(provider, "_disabled", False):
            return
        self._bound_provider = provider
        resource = getattr(getattr(provider, "_sdk_config", None), "resource", None)
        for reader in readers:
            if reader in self._hooked:
                continue
            original = reader._receive_metrics
            self._patcher.set(reader, "_receive_metrics",
                              _ReceiveHook(self, reader, original, resource))
            self._hooked.add(reader)

    def _record_directly(self, provider: Any) -> None:
        """Fallback for a non-SDK MeterProvider: one synchronous record per measurement."""
        from . import __version__

        meter = provider.get_meter(_names.INSTRUMENTATION_SCOPE, __version__)
        made = {
            spec.name: meter.create_histogram(
                spec.name, unit=spec.unit, description=spec.description,
                explicit_bucket_boundaries_advisory=list(_BOUNDS),
            )
            for spec in _names.METRICS if spec.instrument == "histogram"
        }
        for histogram in self._histograms:
            histogram.forward_to(made[histogram.spec.name].record)
        logger.info(
            "asyncdiag: MeterProvider %s is not the OpenTelemetry SDK's; duration histograms "
            "are recorded through its API (slower than asyncdiag's own aggregation)",
            type(provider).__qualname__,
        )

    def _merge_histograms(self, reader: Any, data: MetricsData, resource: Any) -> MetricsData:
        """``data`` plus asyncdiag's histograms, in the temporality ``reader`` asked for."""
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Metric,
            MetricsData,
            ResourceMetrics,
            ScopeMetrics,
        )
        from opentelemetry.sdk.metrics.export import Histogram as HistogramData
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from . import __version__

        temporality = _histogram_temporality(reader)
        delta = temporality == AggregationTemporality.DELTA
        now = time_ns()
        new_metrics = []
        for histogram in self._histograms:
            points = self._data_points(reader, histogram, delta, now)
            if points:
                spec = histogram.spec
                new_metrics.append(Metric(
                    name=spec.name, description=spec.description, unit=spec.unit,
                    data=HistogramData(data_points=points, aggregation_temporality=temporality),
                ))
        if not new_metrics:
            return data
        resource_metrics = list(data.resource_metrics)
        if not resource_metrics:
            if resource is None:
                return data
            resource_metrics = [ResourceMetrics(resource=resource, scope_metrics=[],
                                                schema_url="")]
        first = resource_metrics[0]
        scopes = list(first.scope_metrics)
        for index, scope_metrics in enumerate(scopes):
            if scope_metrics.scope.name == _names.INSTRUMENTATION_SCOPE:
                scopes[index] = ScopeMetrics(
                    scope=scope_metrics.scope,
                    metrics=[*scope_metrics.metrics, *new_metrics],
                    schema_url=scope_metrics.schema_url,
                )
                break
        else:
            scopes.append(ScopeMetrics(
                scope=InstrumentationScope(_names.INSTRUMENTATION_SCOPE, __version__),
                metrics=new_metrics, schema_url="",
            ))
        resource_metrics[0] = ResourceMetrics(
            resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url
        )
        return MetricsData(resource_metrics=resource_metrics)

    def _data_points(self, reader: Any, histogram: _Histogram, delta: bool,
                     now: int) -> list[HistogramDataPoint]:
        from opentelemetry.sdk.metrics.export import HistogramDataPoint

        bounds = list(_BOUNDS)
        result: list[HistogramDataPoint] = []
        previous_state = self._delta_state.setdefault(reader, {}) if delta else None
        for key, attributes, point in histogram.snapshot():
            counts = [int(c) for c in point[:_NBUCKETS]]
            total, low, high = point[_SUM], point[_MIN], point[_MAX]
            start = histogram.start_ns
            if previous_state is not None:
                state_key = (histogram.spec.name, key)
                previous, start = previous_state.get(state_key, (None, histogram.start_ns))
                previous_state[state_key] = (point, now)
                if previous is not None:
                    counts = [c - int(p) for c, p in zip(counts, previous[:_NBUCKETS], strict=True)]
                    total -= previous[_SUM]
                    low, high = _delta_min_max(counts, low, high)
            count = sum(counts)
            if count == 0:
                continue
            result.append(HistogramDataPoint(
                attributes=attributes, start_time_unix_nano=start, time_unix_nano=now,
                count=count, sum=total, bucket_counts=counts, explicit_bounds=bounds,
                min=low, max=high,
            ))
        return result

    # -- findings ---------------------------------------------------------------------------
    def _finding_sink(self, finding: Finding, span: Any) -> None:
        totals = self._findings.totals
        if finding.kind in totals:
            totals[finding.kind] += 1
        else:
            self._findings.add_new(finding.kind, {_names.ATTR_KIND: finding.kind}, 1)
        target = span if span is not None else trace.get_current_span()
        if target.is_recording():
            target.add_event(_names.FINDING_EVENT, finding_event_attributes(finding))


def finding_event_attributes(finding: Finding) -> dict[str, AttributeValue]:
    """The attributes of a finding's span event. Only the contract's fields: kind, subject
    (a code name), location (``path:line``), message and duration; never the task name (it
    may be built from request data) nor the stack."""
    attributes: dict[str, AttributeValue] = {
        _names.EVENT_ATTR_KIND: finding.kind,
        _names.EVENT_ATTR_SUBJECT: finding.subject,
        _names.EVENT_ATTR_MESSAGE: finding.message,
    }
    if finding.location:
        attributes[_names.EVENT_ATTR_LOCATION] = finding.location
    if finding.duration is not None:
        attributes[_names.EVENT_ATTR_DURATION] = finding.duration
    return attributes


def _histogram_temporality(reader: Any) -> Any:
    """The temporality ``reader`` wants for histograms (cumulative unless it asked for delta).

    Readers keep their preference keyed by the SDK's internal instrument classes
    (``_Histogram``, what a synchronous histogram is), so that is what is looked up.
    """
    from opentelemetry.sdk.metrics.export import AggregationTemporality

    temporalities = getattr(reader, "_instrument_class_temporality", None) or {}
    try:
        from opentelemetry.sdk.metrics._internal.instrument import _Histogram
    except ImportError:  # pragma: no cover - SDK layout changed: keep the default
        return AggregationTemporality.CUMULATIVE
    found = temporalities.get(_Histogram, AggregationTemporality.CUMULATIVE)
    return found if found == AggregationTemporality.DELTA else (
        AggregationTemporality.CUMULATIVE)


def _delta_min_max(counts: Sequence[int], low: float, high: float) -> tuple[float, float]:
    """Bounds for a delta interval's min/max: only cumulative extremes are tracked (two more
    stores per record would cost the hot path), so they are clipped to the occupied buckets."""
    occupied = [i for i, c in enumerate(counts) if c]
    if not occupied:
        return math.inf, -math.inf
    first, last = occupied[0], occupied[-1]
    lower_bound = _BOUNDS[first - 1] if first > 0 else -math.inf
    upper_bound = _BOUNDS[last] if last < len(_BOUNDS) else math.inf
    return max(low, lower_bound), min(high, upper_bound)
