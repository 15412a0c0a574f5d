"""Helpers for your own tests: capture what asyncdiag reports while a block of code runs.

    import asyncdiag.testing

    def test_pool_releases_connections():
        with asyncdiag.testing.capture(instrument="myapp.db:Pool") as captured:
            asyncio.run(main())
        assert captured.findings == []
        assert "async with Pool" in captured.span_names()
        assert captured.metric("asyncdiag.context.exit.duration")

``capture()`` installs the agent for the block and uninstalls it after, or reuses an agent
that is already installed (by the pytest plugin, ``ASYNCDIAG_ENABLED=1`` or your code) and
leaves it installed. Findings, spans and metrics go to memory through the OpenTelemetry SDK's
own in-memory exporter and reader; nothing is exported anywhere else because of the capture.
It is a plain context manager, so it works around ``asyncio.run`` and around loops created
inside the block, and also as ``async with`` inside a running loop.

Findings captured by a block belong to the test that asserts on them: the pytest plugin
(``pytest --asyncdiag``) does not fail a test for them (``claim=False`` to change that).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import sys
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from . import _findings, _lifecycle
from ._findings import Finding

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = ["Capture", "capture"]

# Findings seen by a claiming capture, by identity (Finding has slots: no weak references);
# the pytest plugin consults it before failing a test. Bounded: the oldest entries go first.
_MAX_CLAIMED = 10_000
_claimed: OrderedDict[int, Finding] = OrderedDict()
_claimed_lock = threading.Lock()


def is_claimed(finding: Finding) -> bool:
    """True if a ``capture(claim=True)`` block saw this finding (used by the pytest plugin)."""
    return _claimed.get(id(finding)) is finding


def _claim(finding: Finding) -> None:
    with _claimed_lock:
        _claimed[id(finding)] = finding
        while len(_claimed) > _MAX_CLAIMED:
            _claimed.popitem(last=False)


def capture(
    *,
    collect_garbage: bool = True,
    claim: bool = True,
    debug: bool | None = None,
    slow_callback_duration: float | None = None,
    blocked_threshold: float | None = None,
    track_asyncgens: bool | None = None,
    instrument: str | Sequence[str] | None = None,
    slow_teardown_threshold: float | None = None,
) -> Capture:
    """Capture findings, spans and metrics in memory for the duration of a ``with`` block.

    The agent options are those of ``asyncdiag.install`` and apply only when the block
    installs the agent itself. ``collect_garbage`` runs ``gc.collect()`` before the block
    ends, so that generators and coroutines dropped inside it (even in reference cycles) are
    finalized and reported inside it.
    """
    options: dict[str, Any] = {
        "debug": debug,
        "slow_callback_duration": slow_callback_duration,
        "blocked_threshold": blocked_threshold,
        "track_asyncgens": track_asyncgens,
        "instrument": tuple(instrument) if isinstance(instrument, (list, tuple)) else instrument,
        "slow_teardown_threshold": slow_teardown_threshold,
    }
    return Capture({k: v for k, v in options.items() if v is not None},
                   collect_garbage=collect_garbage, claim=claim)


class _SpanTee(Protocol):
    exporters: list[InMemorySpanExporter]


def _new_span_tee() -> _SpanTee:
    """One span processor added to an existing SDK tracer's processor chain: it forwards the
    spans that end while a capture is active, and nothing otherwise. The SDK cannot remove a
    span processor, so it is added once per chain and stays inert between captures.
    (A subclass of the SDK's SpanProcessor, so hooks added to the interface later, such as
    ``_on_ending``, have their no-op defaults.)"""
    from opentelemetry.sdk.trace import SpanProcessor

    class SpanTee(SpanProcessor):
        def __init__(self) -> None:
            self.exporters: list[InMemorySpanExporter] = []

        def on_end(self, span: ReadableSpan) -> None:
            for exporter in list(self.exporters):
                exporter.export((span,))

    return SpanTee()


def _forget_reader_patches(telemetry: Any, reader: Any) -> None:
    """The agent keeps a record of each reader it hooked, to unhook it at uninstall; this
    capture's reader is thrown away now, so drop its records rather than keep the reader and
    its provider alive until the agent is uninstalled (a session of captures would pile up)."""
    patches = getattr(getattr(telemetry, "_patcher", None), "_patches", None)
    if isinstance(patches, list):
        patches[:] = [p for p in patches if getattr(p, "owner", None) is not reader]


def _retarget_tracer(telemetry: Any, tracer: Any) -> Callable[[], None]:
    """Point the agent's tracer, and the instrumentation's copy of it (kept, with its sampling
    decision, for the hot path), at ``tracer``; returns the undo."""
    original = telemetry.tracer
    telemetry.tracer = tracer
    proxies = sys.modules.get("asyncdiag._proxies")
    runtime: Any = getattr(proxies, "RUNTIME", None)
    spans = sys.modules.get("asyncdiag._spans")
    saved: tuple[Any, Any, Any, Any] | None = None
    if runtime is not None and spans is not None and runtime.telemetry is telemetry:
        saved = (runtime.tracer, runtime.mode, runtime.mode_final, runtime.tracing)
        runtime.tracer = tracer
        runtime.mode, runtime.mode_final = spans.evaluate(tracer)
        runtime.tracing = runtime.mode != spans.NEVER or not runtime.mode_final

    def undo() -> None:
        if telemetry.tracer is tracer:
            telemetry.tracer = original
        if saved is not None and runtime.tracer is tracer:
            runtime.tracer, runtime.mode, runtime.mode_final, runtime.tracing = saved

    return undo


_tees: weakref.WeakKeyDictionary[Any, _SpanTee] = weakref.WeakKeyDictionary()
_tees_lock = threading.Lock()


class Capture:
    """What one ``capture()`` block saw. Read it inside the block (live) or after it."""

    def __init__(self, options: dict[str, Any], *, collect_garbage: bool, claim: bool) -> None:
        self._options = options
        self._collect_garbage = collect_garbage
        self._claim = claim
        self._lock = threading.Lock()
        self._occurrences: list[Finding] = []
        self._active = False
        self._installed = False
        self._span_exporter: InMemorySpanExporter | None = None
        self._tracer_provider: TracerProvider | None = None
        self._meter_provider: MeterProvider | None = None
        self._metric_reader: InMemoryMetricReader | None = None
        self._undo: list[Any] = []
        self.agent: _lifecycle.Agent | None = None
        self.metrics_data: MetricsData | None = None

    # -- results -------------------------------------------------------------------------
    @property
    def occurrences(self) -> list[Finding]:
        """Every report seen, in order, unfolded (each with ``count == 1``)."""
        with self._lock:
            return list(self._occurrences)

    @property
    def findings(self) -> list[Finding]:
        """The findings of the block, folded by kind and location as ``asyncdiag.findings()``
        folds them (``count`` is the number of occurrences inside the block)."""
        folded: dict[tuple[str, str], Finding] = {}
        for finding in self.occurrences:
            previous = folded.get(finding.key)
            if previous is None:
                folded[finding.key] = finding
                continue
            durations = [d for d in (previous.duration, finding.duration) if d is not None]
            folded[finding.key] = dataclasses.replace(
                previous, count=previous.count + finding.count,
                duration=max(durations) if durations else None, last_seen=finding.last_seen,
            )
        return list(folded.values())

    def kinds(self) -> set[str]:
        return {finding.kind for finding in self.occurrences}

    def findings_of(self, kind: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]

    @property
    def spans(self) -> tuple[ReadableSpan, ...]:
        """Finished asyncdiag spans (``opentelemetry.sdk.trace.ReadableSpan``)."""
        if self._span_exporter is None:
            return ()
        return tuple(self._span_exporter.get_finished_spans())

    def span_names(self) -> list[str]:
        return [span.name for span in self.spans]

    @property
    def metrics(self) -> dict[str, list[Any]]:
        """asyncdiag's metric points by metric name, from the collection at the end of the
        block (or the last ``collect_metrics()``). Counters and histograms count what
        happened inside the block (delta temporality); up-down counters and gauges are
        current values."""
        result: dict[str, list[Any]] = {}
        data = self.metrics_data
        if data is None:
            return result
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name != "asyncdiag":
                    continue
                for metric in scope_metrics.metrics:
                    result.setdefault(metric.name, []).extend(metric.data.data_points)
        return result

    def metric(self, name: str) -> list[Any]:
        """The data points of one metric (empty if it recorded nothing)."""
        return self.metrics.get(name, [])

    def collect_metrics(self) -> dict[str, list[Any]]:
        """Collect now (inside the block); returns ``metrics``."""
        if self._metric_reader is not None and self._active:
            self.metrics_data = self._metric_reader.get_metrics_data()
        return self.metrics

    # -- context manager -----------------------------------------------------------------
    def __enter__(self) -> Capture:
        if self._active:
            raise RuntimeError("this capture() is already active; make a new one")
        self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._finish()

    async def __aenter__(self) -> Capture:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._finish()

    def _start(self) -> None:
        from opentelemetry.sdk.metrics import Counter as SdkCounter
        from opentelemetry.sdk.metrics import Histogram as SdkHistogram
        from opentelemetry.sdk.metrics import (
            MeterProvider,
            ObservableCounter,
            ObservableUpDownCounter,
            UpDownCounter,
        )
        from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        # Through sys.modules, as install() imports it: after an in-process pytester run has
        # restored sys.modules, the package attribute may name a stale copy of the module.
        _telemetry = importlib.import_module("asyncdiag._telemetry")

        delta = AggregationTemporality.DELTA
        cumulative = AggregationTemporality.CUMULATIVE
        self._metric_reader = InMemoryMetricReader(preferred_temporality={
            SdkCounter: delta, SdkHistogram: delta, ObservableCounter: delta,
            UpDownCounter: cumulative, ObservableUpDownCounter: cumulative,
        })
        self._meter_provider = MeterProvider(metric_readers=[self._metric_reader],
                                             shutdown_on_exit=False)
        exporter = self._span_exporter = InMemorySpanExporter()
        self._listen()
        self._active = True
        try:
            agent = _lifecycle.current()
            if agent is None:
                self._tracer_provider = TracerProvider(shutdown_on_exit=False)
                self._tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
                _telemetry.use_providers(self._tracer_provider, self._meter_provider)
                options = dict(self._options)
                options.setdefault("exporter", "none")
                try:
                    agent = _lifecycle.install(**options)
                finally:
                    _telemetry.use_providers()
                self._installed = True
            else:
                self._attach(agent, _telemetry, exporter, self._meter_provider)
            self.agent = agent
            # The baseline: the end-of-block collection then reports only the block's deltas.
            self._metric_reader.get_metrics_data()
        except BaseException:
            self._finish()
            raise

    def _attach(self, agent: _lifecycle.Agent, telemetry_module: Any,
                exporter: InMemorySpanExporter, meter_provider: MeterProvider) -> None:
        """Tee an installed agent's spans and metrics into this capture."""
        from opentelemetry.sdk.trace import TracerProvider

        telemetry = agent.telemetry
        # The SDK Tracer's processor chain (the provider's active multi-span processor).
        chain = getattr(telemetry.tracer, "span_processor", None)
        if chain is not None and hasattr(chain, "add_span_processor"):
            with _tees_lock:
                tee = _tees.get(chain)
                if tee is None:
                    tee = _tees[chain] = _new_span_tee()
                    chain.add_span_processor(tee)
            tee.exporters.append(exporter)
            self._undo.append(lambda: tee.exporters.remove(exporter))
        else:
            # The agent records no spans (no SDK tracer provider): give it a recording tracer
            # for the block, and take it back after if nobody replaced it meanwhile.
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor

            from . import __version__

            provider = self._tracer_provider = TracerProvider(shutdown_on_exit=False)
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            ours = provider.get_tracer("asyncdiag", __version__)
            self._undo.append(_retarget_tracer(telemetry, ours))
        telemetry_module._observable_instruments(meter_provider)
        # Hooking our reader makes our provider the one the agent re-checks for new readers;
        # the agent's own is put back when the block ends.
        bound = getattr(telemetry, "_bound_provider", None)
        telemetry._bind_histograms(meter_provider)
        reader = self._metric_reader

        def unbind() -> None:
            _forget_reader_patches(telemetry, reader)
            if getattr(telemetry, "_bound_provider", None) is meter_provider:
                telemetry._bound_provider = bound

        self._undo.append(unbind)

    def _finish(self) -> None:
        if not self._active:
            return
        try:
            if self._collect_garbage:
                gc.collect()
            if self._metric_reader is not None:
                try:
                    self.metrics_data = self._metric_reader.get_metrics_data()
                except Exception:  # a reader already shut down: keep the last collection
                    pass
        finally:
            self._active = False
            self._unlisten()
            while self._undo:
                self._undo.pop()()
            if self._installed:
                self._installed = False
                _lifecycle.uninstall()
            if self._tracer_provider is not None:
                self._tracer_provider.shutdown()
            if self._meter_provider is not None:
                self._meter_provider.shutdown()

    # -- findings ------------------------------------------------------------------------
    def _listen(self) -> None:
        _findings.STORE.add_listener(self._on_finding)

    def _unlisten(self) -> None:
        _findings.STORE.remove_listener(self._on_finding)

    def _on_finding(self, finding: Finding) -> None:
        with self._lock:
            self._occurrences.append(finding)
        if self._claim:
            _claim(finding)

