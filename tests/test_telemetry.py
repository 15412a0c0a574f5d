"""Telemetry in process, on private SDK providers (the global ones are never touched here):
aggregation equal to the SDK's own, temporality, bounded cardinality, reader hooks undone on
uninstall, finding events, the non-SDK fallback, exporter selection, dropped spans and the
bounded shutdown."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import timeit
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asyncdiag
from asyncdiag import _findings, _lifecycle, _names, _otel_pipeline, _telemetry
from asyncdiag._otel_instrumentor import AsyncdiagInstrumentor
from otlp_receiver import HangingCollector


class Providers:
    def __init__(self, temporality: AggregationTemporality | None = None) -> None:
        preferred = {SdkHistogram: temporality} if temporality is not None else None
        self.reader = InMemoryMetricReader(preferred_temporality=preferred)
        self.meter_provider = MeterProvider([self.reader], shutdown_on_exit=False)
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))

    def install(self, **kwargs: Any) -> asyncdiag.Agent:
        _telemetry.use_providers(self.tracer_provider, self.meter_provider)
        return asyncdiag.install(exporter="none", **kwargs)

    def collect(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        found: dict[str, Any] = {}
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                if sm.scope.name != _names.INSTRUMENTATION_SCOPE:
                    continue
                for metric in sm.metrics:
                    assert metric.name not in found, f"{metric.name} exported twice"
                    found[metric.name] = metric
        return found


@pytest.fixture
def providers() -> Iterator[Providers]:
    p = Providers()
    yield p
    asyncdiag.uninstall()
    p.meter_provider.shutdown()
    p.tracer_provider.shutdown()


def sdk_reference(values: list[float]) -> Any:
    reader = InMemoryMetricReader()
    provider = MeterProvider([reader], shutdown_on_exit=False)
    histogram = provider.get_meter("reference").create_histogram(
        "h", unit="s", explicit_bucket_boundaries_advisory=list(_names.DURATION_BUCKETS)
    )
    for value in values:
        histogram.record(value, {_names.ATTR_SUBJECT: "m.C"})
    data = reader.get_metrics_data()
    provider.shutdown()
    return data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points[0]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(st.sampled_from((*_names.DURATION_BUCKETS, 0.0)),
                  st.floats(min_value=0, max_value=30, allow_nan=False)),
        min_size=1, max_size=60,
    ),
    # Copies of the list recorded in a row, so that series fill up and fold on the hot path
    # (every FOLD_AT values) as well as at collection.
    st.sampled_from((1, 3, 2 * _telemetry.FOLD_AT + 1)),
    st.booleans(),  # collect once in the middle too
)
def test_aggregation_equals_the_sdk_histogram(values: list[float], copies: int,
                                              collect_midway: bool) -> None:
    values = values * copies
    p = Providers()
    try:
        telemetry = p.install().telemetry
        for index, value in enumerate(values):
            telemetry.record_enter("m.C", value)
            if collect_midway and index == len(values) // 2:
                p.collect()
        metric = p.collect()[_names.CONTEXT_ENTER_DURATION.name]
    finally:
        asyncdiag.uninstall()
        p.meter_provider.shutdown()
    (ours,) = metric.data.data_points
    reference = sdk_reference(values)
    assert list(ours.bucket_counts) == list(reference.bucket_counts)
    assert list(ours.explicit_bounds) == list(reference.explicit_bounds)
    assert ours.count == reference.count
    assert ours.sum == pytest.approx(reference.sum)
    assert (ours.min, ours.max) == (reference.min, reference.max)
    assert dict(ours.attributes) == dict(reference.attributes)
    assert metric.data.aggregation_temporality == AggregationTemporality.CUMULATIVE


def test_every_metric_reaches_an_sdk_reader_with_names_from_names(providers: Providers) -> None:
    agent = providers.install()
    t = agent.telemetry
    t.record_enter("m.Pool", 0.001)
    t.record_exit("m.Pool", "cancelled", 0.002)
    t.record_next("m.rows", 0.0005)
    t.add_yields("m.rows")
    t.add_yields("m.rows", 4)
    t.record_item("m.rows", 0.0007)  # = record_next + add_yields(1)
    t.record_item("m.other", 0.0007)
    t.asyncgen_active(1)
    t.asyncgen_active(1)
    t.asyncgen_active(-1)
    t.record_loop_lag(0.003)
    t.record_slow_callback(0.3)
    t.add_task_count_source(lambda: [(7, {})])
    _findings.report(_names.NEVER_AWAITED, "coroutine m.f was never awaited", "m.f")
    found = providers.collect()
    assert set(found) == {spec.name for spec in _names.METRICS}
    for spec in _names.METRICS:
        assert found[spec.name].unit == spec.unit
        assert found[spec.name].description == spec.description
    points = {name: list(metric.data.data_points) for name, metric in found.items()}
    yields = {dict(p.attributes)[_names.ATTR_SUBJECT]: p.value
              for p in points[_names.ITERATOR_YIELDS.name]}
    assert yields == {"m.rows": 6, "m.other": 1}
    nexts = {dict(p.attributes)[_names.ATTR_SUBJECT]: (p.count, p.sum)
             for p in points[_names.ITERATOR_NEXT_DURATION.name]}
    assert nexts == {"m.rows": (2, pytest.approx(0.0012)), "m.other": (1, 0.0007)}
    assert points[_names.ASYNCGEN_ACTIVE.name][0].value == 1
    assert points[_names.LOOP_TASKS.name][0].value == 7
    assert dict(points[_names.FINDINGS.name][0].attributes) == {
        _names.ATTR_KIND: _names.NEVER_AWAITED}
    assert dict(points[_names.CONTEXT_EXIT_DURATION.name][0].attributes) == {
        _names.ATTR_SUBJECT: "m.Pool", _names.ATTR_OUTCOME: "cancelled"}


def test_delta_temporality_reports_each_interval_once() -> None:
    p = Providers(AggregationTemporality.DELTA)
    try:
        t = p.install().telemetry
        for _ in range(3):
            t.record_next("m.rows", 0.0004)
        first = p.collect()[_names.ITERATOR_NEXT_DURATION.name]
        assert first.data.aggregation_temporality == AggregationTemporality.DELTA
        (point,) = first.data.data_points
        assert point.count == 3
        t.record_next("m.rows", 0.02)
        t.record_next("m.rows", 0.03)
        (second,) = p.collect()[_names.ITERATOR_NEXT_DURATION.name].data.data_points
        assert second.count == 2
        assert second.sum == pytest.approx(0.05)
        assert second.start_time_unix_nano == point.time_unix_nano
        assert 0.01 <= second.min <= 0.02 and 0.03 <= second.max <= 0.05
        assert _names.ITERATOR_NEXT_DURATION.name not in p.collect()  # nothing new
    finally:
        asyncdiag.uninstall()
        p.meter_provider.shutdown()


def test_cardinality_is_bounded_with_an_overflow_point(providers: Providers) -> None:
    t = providers.install().telemetry
    for i in range(_telemetry.MAX_POINTS_PER_METRIC + 50):
        t.record_enter(f"m.C{i}", 0.001)
        t.add_yields(f"m.g{i}")
    found = providers.collect()
    for name in (_names.CONTEXT_ENTER_DURATION.name, _names.ITERATOR_YIELDS.name):
        points = list(found[name].data.data_points)
        assert len(points) == _telemetry.MAX_POINTS_PER_METRIC + 1
        (overflow,) = [p for p in points if dict(p.attributes) == {"otel.metric.overflow": True}]
        assert getattr(overflow, "count", getattr(overflow, "value", None)) == 50


def test_uninstall_unhooks_readers_and_reinstall_does_not_duplicate(
        providers: Providers) -> None:
    providers.install().telemetry.record_enter("m.C", 0.001)
    assert "_receive_metrics" in vars(providers.reader)
    assert _names.CONTEXT_ENTER_DURATION.name in providers.collect()
    asyncdiag.uninstall()
    assert "_receive_metrics" not in vars(providers.reader)
    assert providers.collect() == {}  # callbacks of the old install observe nothing
    t = providers.install().telemetry
    t.record_enter("m.C", 0.001)
    t.add_yields("m.g")
    found = providers.collect()  # asserts each name once
    assert {_names.CONTEXT_ENTER_DURATION.name, _names.ITERATOR_YIELDS.name} <= set(found)
    (point,) = found[_names.CONTEXT_ENTER_DURATION.name].data.data_points
    assert point.count == 1  # a fresh install starts from zero


@pytest.mark.skipif(not hasattr(MeterProvider, "add_metric_reader"),
                    reason="SDK without MeterProvider.add_metric_reader")
def test_reader_added_after_install_gets_the_histograms(providers: Providers) -> None:
    providers.install().telemetry.record_enter("m.C", 0.001)
    later = InMemoryMetricReader()
    providers.meter_provider.add_metric_reader(later)
    data = later.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    assert _names.CONTEXT_ENTER_DURATION.name in names
    asyncdiag.uninstall()
    assert "_receive_metrics" not in vars(later)


def test_finding_is_an_event_on_the_current_or_given_span(providers: Providers) -> None:
    agent = providers.install()
    tracer = agent.telemetry.tracer
    other = tracer.start_span("blocking task span")
    with tracer.start_as_current_span("current"):
        _findings.report(_names.SWALLOWED_EXCEPTION, "m.Tx.__aexit__ returned True", "m.Tx",
                         location="app.py:12")
        _findings.report(_names.LOOP_BLOCKED, "loop blocked for 1.20 s", "m.work",
                         location="app.py:30", duration=1.2, span=other)
    other.end()
    spans = {s.name: s for s in providers.spans.get_finished_spans()}
    (event,) = spans["current"].events
    assert event.name == _names.FINDING_EVENT
    assert dict(event.attributes or {}) == {
        _names.EVENT_ATTR_KIND: _names.SWALLOWED_EXCEPTION,
        _names.EVENT_ATTR_SUBJECT: "m.Tx",
        _names.EVENT_ATTR_MESSAGE: "m.Tx.__aexit__ returned True",
        _names.EVENT_ATTR_LOCATION: "app.py:12",
    }
    (blocked,) = spans["blocking task span"].events
    assert dict(blocked.attributes or {})[_names.EVENT_ATTR_DURATION] == 1.2
    assert set(dict(blocked.attributes or {})) <= set(_names.FINDING_EVENT_ATTRIBUTES)
    counts = {dict(p.attributes)[_names.ATTR_KIND]: p.value for p in
              providers.collect()[_names.FINDINGS.name].data.data_points}
    assert counts == {_names.SWALLOWED_EXCEPTION: 1, _names.LOOP_BLOCKED: 1}


class VendorMeterProvider(metrics_api.MeterProvider):
    """A MeterProvider that is not the SDK's (as vendor distributions ship): it hands out
    the meters of an SDK provider it wraps, so asyncdiag cannot reach any reader."""

    def __init__(self, inner: MeterProvider) -> None:
        self.inner = inner

    def get_meter(self, name: str, version: str | None = None, schema_url: str | None = None,
                  attributes: Any = None) -> metrics_api.Meter:
        return self.inner.get_meter(name, version, schema_url)


def test_non_sdk_meter_provider_gets_direct_records(providers: Providers) -> None:
    vendor = VendorMeterProvider(providers.meter_provider)
    _telemetry.use_providers(providers.tracer_provider, vendor)
    t = asyncdiag.install(exporter="none").telemetry
    # Nothing collects on a vendor provider's behalf: every value goes straight through.
    assert all(h.sink is not None and h.limit == 1 for h in t._histograms)
    t.record_enter("m.C", 0.0004)
    t.record_exit("m.C", "ok", 0.0004)
    t.record_loop_lag(0.001)
    t.record_item("m.rows", 0.0004)
    found = providers.collect()
    (point,) = found[_names.CONTEXT_ENTER_DURATION.name].data.data_points
    assert point.count == 1
    (item,) = found[_names.ITERATOR_NEXT_DURATION.name].data.data_points
    (yielded,) = found[_names.ITERATOR_YIELDS.name].data.data_points
    assert (item.count, yielded.value) == (1, 1)
    assert tuple(point.explicit_bounds) == _names.DURATION_BUCKETS  # the advisory was used
    assert "_receive_metrics" not in vars(providers.reader)
    asyncdiag.uninstall()
    assert all(h.sink is None and h.limit == _telemetry.FOLD_AT for h in t._histograms)


def test_instrumentor_installs_with_given_providers_and_uninstalls(
        providers: Providers) -> None:
    instrumentor = AsyncdiagInstrumentor()
    assert tuple(instrumentor.instrumentation_dependencies()) == ()
    instrumentor.instrument(tracer_provider=providers.tracer_provider,
                            meter_provider=providers.meter_provider)
    try:
        agent = _lifecycle.current()
        assert agent is not None
        agent.telemetry.record_enter("m.C", 0.001)
        with agent.telemetry.tracer.start_as_current_span("s"):
            pass
        assert _names.CONTEXT_ENTER_DURATION.name in providers.collect()
        assert [s.name for s in providers.spans.get_finished_spans()] == ["s"]
    finally:
        instrumentor.uninstrument()
    assert _lifecycle.current() is None


def test_instrumentor_leaves_an_agent_it_did_not_install() -> None:
    agent = asyncdiag.install(exporter="none")
    instrumentor = AsyncdiagInstrumentor()
    instrumentor.instrument()
    instrumentor.uninstrument()
    assert _lifecycle.current() is agent


@pytest.mark.parametrize(("env", "exporter", "signal", "expected"), [
    ({}, "otlp", "traces", ["otlp_proto_grpc"]),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "otlp", "metrics", ["otlp_proto_http"]),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "otlp", "traces", ["otlp_proto_grpc"]),
    ({"OTEL_TRACES_EXPORTER": "console, otlp"}, "otlp", "traces",
     ["console", "otlp_proto_grpc"]),
    ({"OTEL_METRICS_EXPORTER": "prometheus"}, "console", "metrics", ["prometheus"]),
    ({"OTEL_METRICS_EXPORTER": "none"}, "otlp", "metrics", []),
    ({}, "console", "traces", []),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "none", "traces", []),
])
def test_exporter_selection(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                            exporter: str, signal: Any, expected: list[str]) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _otel_pipeline.exporter_names(signal, exporter) == expected


def test_invalid_settings_are_one_warning_each(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,no-such-exporter")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(taken.getsockname()[1]))
        with caplog.at_level(logging.WARNING, logger="asyncdiag"):
            pipeline = _otel_pipeline.build("otlp", traces=True, metrics=True)
    try:
        messages = [r.getMessage() for r in caplog.records if r.name == "asyncdiag"]
        assert any("carrier-pigeon" in m and "otlp_proto_grpc" in m for m in messages)
        assert any("no-such-exporter" in m for m in messages)
        assert any("cannot serve Prometheus metrics" in m for m in messages)
        assert pipeline.tracer_provider is not None  # the valid exporter still works
        assert pipeline.meter_provider is None
    finally:
        assert pipeline.shutdown(2.0)


def test_full_queue_drops_and_counts_spans_without_blocking_or_logging(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "64")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "16")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    with HangingCollector() as hanging:
        exporter = OTLPSpanExporter(endpoint=hanging.endpoint, insecure=True, timeout=30)
        processor = _otel_pipeline.CountingBatchSpanProcessor(exporter)
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(processor)
        pipeline = _otel_pipeline.Pipeline(tracer_provider=provider,
                                           span_processors=[processor], exporters=[exporter])
        tracer = provider.get_tracer("t")
        with caplog.at_level(logging.DEBUG):
            started = time.perf_counter()
            for _ in range(2000):
                tracer.start_span("s").end()
            elapsed = time.perf_counter() - started
        assert processor.dropped >= 2000 - 64 - 16 * 4
        assert not [r for r in caplog.records if "Queue full" in r.getMessage()]
        # 2000 spans; an export blocking the caller would take the 30 s export timeout.
        assert elapsed < 5, elapsed
        with caplog.at_level(logging.WARNING, logger="asyncdiag"):
            started = time.monotonic()
            finished = pipeline.shutdown(0.5)
            took = time.monotonic() - started
        assert not finished
        assert took < 2.0, took
        messages = " ".join(r.getMessage() for r in caplog.records if r.name == "asyncdiag")
        assert f"{processor.dropped} span(s) were dropped" in messages
        assert "did not finish within 0.5 s" in messages


def test_hot_path_methods_cost_a_fraction_of_an_sdk_record() -> None:
    """The detectors' per-operation budget is a few µs; one SDK record is several µs."""
    telemetry = _telemetry.Telemetry()
    reader = InMemoryMetricReader()
    provider = MeterProvider([reader], shutdown_on_exit=False)
    histogram = provider.get_meter("bench").create_histogram("h", unit="s")
    attrs = {_names.ATTR_SUBJECT: "m.Pool"}
    ns = {"t": telemetry, "h": histogram, "attrs": attrs}

    def best(stmt: str, number: int) -> float:
        return min(timeit.repeat(stmt, globals=ns, number=number, repeat=5)) / number

    sdk = best("h.record(0.0004, attrs)", 2000)
    for stmt in ("t.record_enter('m.Pool', 0.0004)", "t.record_exit('m.Pool', 'ok', 0.0004)",
                 "t.record_next('m.rows', 0.0004)", "t.add_yields('m.rows')",
                 "t.record_item('m.rows', 0.0004)"):
        ours = best(stmt, 20000)
        assert ours < sdk * 0.25, (stmt, ours, sdk)
    provider.shutdown()


def test_nothing_sets_the_global_providers(providers: Providers,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncdiag's own providers stay private (set-once globals could not be restored)."""
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    before = (trace_api.get_tracer_provider(), metrics_api.get_meter_provider())
    agent = asyncdiag.install(exporter="otlp")
    pipeline = agent.telemetry._pipeline
    assert pipeline is not None and pipeline.meter_provider is not None
    assert (trace_api.get_tracer_provider(), metrics_api.get_meter_provider()) == before
    asyncdiag.uninstall()
    assert agent.telemetry._pipeline is None


def test_delta_min_max_stays_within_the_occupied_buckets() -> None:
    counts = [0] * (len(_names.DURATION_BUCKETS) + 1)
    counts[3] = 2  # (5e-05, 1e-04]
    low, high = _telemetry._delta_min_max(counts, 1e-6, 9.0)
    assert (low, high) == (_names.DURATION_BUCKETS[2], _names.DURATION_BUCKETS[3])
    assert _telemetry._delta_min_max([0] * len(counts), 0.1, 0.2) == (math.inf, -math.inf)


def test_own_pipeline_threads_and_port_are_gone_after_uninstall(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import urllib.error
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    before = set(threading.enumerate())
    agent = asyncdiag.install(exporter="console")
    agent.telemetry.record_enter("m.C", 0.001)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert b"asyncdiag_context_enter_duration_seconds_count" in response.read()
    assert set(threading.enumerate()) - before  # the batch processor and the HTTP server
    asyncdiag.uninstall()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(threading.enumerate()) - before
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_broken_export_setup_never_fails_install(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("cannot import name '_import_exporters'")

    monkeypatch.setattr(_otel_pipeline, "_build", broken)
    with caplog.at_level(logging.WARNING, logger="asyncdiag"):
        agent = asyncdiag.install(exporter="otlp")
    assert agent.installed and agent.telemetry._pipeline is None
    assert any("could not be set up" in r.getMessage() for r in caplog.records)


def test_no_value_is_lost_when_collection_races_the_recording_thread(
        providers: Providers) -> None:
    """Series are emptied by slicing off their head while another thread appends."""
    telemetry = providers.install().telemetry
    total = 50 * _telemetry.FOLD_AT + 7
    done = threading.Event()

    def record() -> None:
        for _ in range(total):
            telemetry.record_enter("m.C", 0.0003)
        done.set()

    recorder = threading.Thread(target=record)
    recorder.start()
    collections = 0
    while not done.is_set() or collections < 3:
        providers.collect()
        collections += 1
    recorder.join()
    (point,) = providers.collect()[_names.CONTEXT_ENTER_DURATION.name].data.data_points
    assert point.count == total
    assert point.sum == pytest.approx(total * 0.0003)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(
        st.one_of(st.sampled_from((*_names.DURATION_BUCKETS, 0.0)),
                  st.floats(min_value=0, max_value=30, allow_nan=False),
                  st.floats(min_value=-1e-9, max_value=1e-9)),
        min_size=1, max_size=300,
    ), min_size=1, max_size=4),
)
def test_the_c_fold_adds_what_the_python_fold_adds(batches: list[list[float]]) -> None:
    """The same counts per bucket (values on a bound included), min and max; the same sum up
    to the order of the additions."""
    fold_c = pytest.importorskip("asyncdiag._speedups").fold_into
    assert _telemetry._fold_into is fold_c
    bounds = _names.DURATION_BUCKETS
    by_c, by_python = _telemetry._new_point(), _telemetry._new_point()
    for batch in batches:
        fold_c(by_c, list(batch), bounds)
        _telemetry._fold_into_python(by_python, list(batch), bounds)
    nbuckets = len(bounds) + 1
    assert by_c[:nbuckets] == by_python[:nbuckets]
    assert all(type(count) is int for count in by_c[:nbuckets])
    assert by_c[nbuckets] == pytest.approx(by_python[nbuckets], rel=1e-12, abs=1e-15)
    assert by_c[nbuckets + 1:] == by_python[nbuckets + 1:]
    with pytest.raises(TypeError):
        fold_c(by_c, ["not a number"], bounds)


@pytest.mark.parametrize("implementation", ["c", "python"])
def test_record_since_appends_the_elapsed_time_and_folds_when_full(implementation: str) -> None:
    if implementation == "c":
        record = pytest.importorskip("asyncdiag._speedups").record_since
        assert _telemetry.record_since is record
    else:
        record = _telemetry._record_since_python
    folded: list[list[float]] = []

    class Histogram:
        def fold(self, series: list[float]) -> None:
            folded.append(list(series))
            series.clear()

    series = _telemetry.Series(Histogram(), [], {}, 3)  # type: ignore[arg-type]
    durations = []
    for _ in range(4):
        t0 = time.perf_counter() - 0.5  # the clock is perf_counter's: half a second ago
        durations.append(record(series, t0))
    assert all(0.5 <= d < 1.0 for d in durations), durations
    assert folded == [durations[:3]]
    assert series == durations[3:]
    with pytest.raises((TypeError, AttributeError)):  # not a series: an error, not a crash
        record(object(), 0.0)  # type: ignore[arg-type]
