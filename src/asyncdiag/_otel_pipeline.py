"""asyncdiag's own OpenTelemetry SDK providers, built from the standard environment.

Used only when the application has not set a global TracerProvider/MeterProvider. Everything
is the SDK's and the exporters' own configuration: which exporters (``OTEL_TRACES_EXPORTER``,
``OTEL_METRICS_EXPORTER``, with ``otlp`` resolved to gRPC or HTTP by
``OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_PROTOCOL`` through the SDK's own helper and entry
points), the resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), the sampler
(``OTEL_TRACES_SAMPLER[_ARG]``), endpoints, headers, timeouts and compression (read by the
exporters), the batch processor (``OTEL_BSP_*``) and the export interval
(``OTEL_METRIC_EXPORT_INTERVAL``). asyncdiag only decides *whether* to build them and bounds
what they may cost the host:

* the providers are private: asyncdiag gets its tracer and meter from them and never makes
  them global. The API's ``set_tracer_provider``/``set_meter_provider`` work once per
  process, so a global set by asyncdiag could not be undone by ``uninstall()`` and would make
  the application's own later ``set_*_provider`` call fail. Applications that want their other
  instrumentations exported too use ``opentelemetry-instrument`` (asyncdiag is one of its
  instrumentors) or set their providers before ``install()``;
* spans go through a batch span processor with a bounded queue; when the queue is full the
  span is dropped and counted (no per-span log line on the event loop thread);
* the SDK's own at-exit shutdown is disabled (it waits up to 30 s per provider on a hung
  collector); asyncdiag shuts down in worker threads and waits a few seconds at most.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry.sdk.trace.export import BatchSpanProcessor

logger = logging.getLogger("asyncdiag")

Signal = Literal["traces", "metrics"]
_EXPORTER_ENV: dict[Signal, str] = {
    "traces": "OTEL_TRACES_EXPORTER",
    "metrics": "OTEL_METRICS_EXPORTER",
}
PROMETHEUS = "prometheus"
_PROMETHEUS_DEFAULT_HOST = "localhost"  # the specification's defaults
_PROMETHEUS_DEFAULT_PORT = 9464


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A batch span processor that drops (and counts) a span when its queue is full.

    The SDK's processor logs a warning for every dropped span, on the thread that ends the
    span, i.e. the event loop: with a collector down for minutes that is thousands of log
    writes on the loop. Here a full queue costs one length check and an increment.
    """

    def __init__(self, exporter: Any) -> None:
        super().__init__(exporter)
        self.dropped = 0

    def on_end(self, span: Any) -> None:
        queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
        maxlen = getattr(queue, "maxlen", None)
        if maxlen is not None and len(queue) >= maxlen:  # type: ignore[arg-type]
            self.dropped += 1
            return
        super().on_end(span)


class _SpareWorker:
    """A daemon thread started with the pipeline and parked until the exit flush needs it.

    Python 3.12 refuses to start threads once atexit handlers run ("can't create new thread
    at interpreter shutdown"), and flushing inline could block for the SDK's 30 s shutdown
    on a hung collector. Tasks handed to this thread are waited for with a deadline; what is
    still running then dies with the process."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="asyncdiag-otel-exit")
        self._thread.start()

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            task()

    def submit(self, task: Callable[[], None]) -> threading.Event:
        done = threading.Event()

        def run() -> None:
            try:
                task()
            finally:
                done.set()

        self._tasks.put(run)
        return done

    def close(self) -> None:
        self._tasks.put(None)


@dataclass
class Pipeline:
    tracer_provider: Any = None
    meter_provider: Any = None
    span_processors: list[CountingBatchSpanProcessor] = field(default_factory=list)
    prometheus_server: Any = None
    prometheus_thread: Any = None
    exporters: list[Any] = field(default_factory=list)
    description: list[str] = field(default_factory=list)
    spare: _SpareWorker | None = None
    _stopped: bool = False

    @property
    def has_providers(self) -> bool:
        return self.tracer_provider is not None or self.meter_provider is not None

    @property
    def dropped_spans(self) -> int:
        return sum(processor.dropped for processor in self.span_processors)

    def shutdown(self, timeout: float) -> bool:
        """Flush and shut down what was built, waiting ``timeout`` seconds at most in total.

        Returns whether everything finished in time. Never raises.
        """
        if self._stopped:
            return True
        self._stopped = True
        for exporter in self.exporters:
            _no_more_retries(exporter)
        tasks: list[tuple[str, Callable[[], object]]] = []
        if self.tracer_provider is not None:
            tasks.append(("traces", self.tracer_provider.shutdown))
        if self.meter_provider is not None:
            provider = self.meter_provider
            millis = timeout * 1000
            tasks.append(("metrics", lambda: provider.shutdown(timeout_millis=millis)))
        if self.prometheus_server is not None:
            server = self.prometheus_server
            tasks.append(("prometheus", lambda: (server.shutdown(), server.server_close())))
        finished = _run_bounded(tasks, timeout, self.spare)
        if self.spare is not None:
            self.spare.close()
        dropped = self.dropped_spans
        if dropped:
            logger.warning(
                "asyncdiag: %d span(s) were dropped because the export queue was full "
                "(collector slow or unreachable; queue size: OTEL_BSP_MAX_QUEUE_SIZE)",
                dropped,
            )
        if not finished:
            logger.warning(
                "asyncdiag: telemetry export did not finish within %g s; the rest is dropped "
                "so that the program can exit (collector slow or unreachable)",
                timeout,
            )
        return finished


def _no_more_retries(exporter: Any) -> None:
    """Make the final export a single attempt.

    The OTLP exporters retry a failed export with exponential backoff for up to their timeout
    (10 s by default), waiting on an event that their own ``shutdown()`` sets. Setting it before
    the final flush keeps the flush (one attempt with a healthy collector) and skips the
    backoff with a collector that refuses connections, so the program exits at once instead
    of after the whole shutdown budget. Exporters without that event are bounded by the
    budget alone.
    """
    for holder, name in ((exporter, "_shutdown_in_progress"),
                         (getattr(exporter, "_client", None), "_shutdown_event")):
        event = getattr(holder, name, None)
        if isinstance(event, threading.Event):
            event.set()


def _run_bounded(
    tasks: list[tuple[str, Callable[[], object]]], timeout: float,
    spare: _SpareWorker | None = None,
) -> bool:
    """Run ``tasks`` in parallel daemon threads; wait ``timeout`` seconds at most in total.
    Where no new thread can be started (at interpreter exit on 3.12), the tasks go to the
    ``spare`` thread started earlier, still waited for with the same deadline."""

    def quietly(name: str, task: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                task()
            except Exception:
                logger.debug("asyncdiag: shutting down %s failed", name, exc_info=True)

        return run

    deadline = time.monotonic() + timeout
    threads: list[threading.Thread] = []
    handed_over: list[threading.Event] = []
    for name, task in tasks:
        thread = threading.Thread(target=quietly(name, task), daemon=True,
                                  name=f"asyncdiag-otel-shutdown-{name}")
        try:
            thread.start()
        except RuntimeError:
            if spare is not None:
                handed_over.append(spare.submit(quietly(name, task)))
            else:  # nothing else can run it: inline, bounded by the exporters' own timeouts
                quietly(name, task)()
            continue
        threads.append(thread)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for done in handed_over:
        done.wait(max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads) and all(
        done.is_set() for done in handed_over)


def exporter_names(signal: Signal, exporter: str) -> list[str]:
    """Entry point names of the exporters to build for ``signal``.

    ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER`` are honoured as the SDK defines them
    whatever ``exporter`` is (except ``none``); when unset, ``exporter == "otlp"`` means the
    OTLP exporter and ``console`` means no OpenTelemetry exporter (the findings summary on
    stderr is asyncdiag's console output).
    """
    from opentelemetry.sdk._configuration import _get_exporter_entry_point

    if exporter == "none":
        return []
    env = _EXPORTER_ENV[signal]
    raw = os.environ.get(env, "").strip()
    if raw:
        names = [name.strip() for name in raw.split(",") if name.strip()]
    else:
        names = ["otlp"] if exporter == "otlp" else []
    if "none" in names:
        return []
    resolved: list[str] = []
    for name in names:
        try:
            entry = _get_exporter_entry_point(name, signal)
        except RuntimeError as exc:
            entry = _get_exporter_entry_point_default(name)
            logger.warning("asyncdiag: %s; using %r instead", exc, entry)
        if entry not in resolved:
            resolved.append(entry)
    return resolved


def _get_exporter_entry_point_default(name: str) -> str:
    # The SDK raises only for an unsupported OTLP protocol; its default protocol is gRPC.
    return "otlp_proto_grpc" if name == "otlp" else name


def _load(signal: Signal, name: str) -> type | None:
    from opentelemetry.sdk._configuration import _import_exporters

    try:
        if signal == "traces":
            found: dict[str, type] = _import_exporters([name], [], [])[0]
        else:
            found = _import_exporters([], [name], [])[1]
    except Exception as exc:
        logger.warning(
            "asyncdiag: %s=%r: %s; this exporter is skipped", _EXPORTER_ENV[signal], name, exc
        )
        return None
    return found.get(name)


def _prometheus_reader(pipeline: Pipeline) -> Any:
    """The SDK's Prometheus reader on a private registry, served on
    ``OTEL_EXPORTER_PROMETHEUS_HOST``/``_PORT`` by ``prometheus_client``'s server.

    The exporter's own ``prometheus`` entry point starts a server it never stops and registers
    in the process-wide registry; asyncdiag keeps the server so that uninstall closes the port.
    """
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or _PROMETHEUS_DEFAULT_HOST
    raw_port = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "").strip()
    try:
        port = int(raw_port) if raw_port else _PROMETHEUS_DEFAULT_PORT
        if not 0 <= port <= 65535:
            raise ValueError(raw_port)
    except ValueError:
        logger.warning(
            "asyncdiag: OTEL_EXPORTER_PROMETHEUS_PORT=%r is not a port number; using %d",
            raw_port, _PROMETHEUS_DEFAULT_PORT,
        )
        port = _PROMETHEUS_DEFAULT_PORT
    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        reader.shutdown()
        logger.warning(
            "asyncdiag: cannot serve Prometheus metrics on %s:%d (%s); the Prometheus "
            "exporter is skipped", host, port, exc,
        )
        return None
    pipeline.prometheus_server, pipeline.prometheus_thread = server, thread
    pipeline.description.append(f"prometheus on http://{host}:{server.server_port}/metrics")
    return reader


def build(exporter: str, *, traces: bool, metrics: bool) -> Pipeline:
    """Build SDK providers for the signals asked for. Never raises: an exporter that cannot be
    built is one warning, and the rest still works; an unexpected failure (e.g. an SDK whose
    configuration helpers moved) is one warning and no export, never a failed install."""
    try:
        return _build(exporter, traces=traces, metrics=metrics)
    except Exception as exc:
        logger.warning("asyncdiag: OpenTelemetry export could not be set up (%r); findings are "
                       "still logged", exc)
        return Pipeline()


def _build(exporter: str, *, traces: bool, metrics: bool) -> Pipeline:
    pipeline = Pipeline()
    if exporter == "none":
        return pipeline
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        logger.info("asyncdiag: OTEL_SDK_DISABLED=true: no spans or metrics are exported")
        return pipeline
    trace_names = exporter_names("traces", exporter) if traces else []
    metric_names = exporter_names("metrics", exporter) if metrics else []
    if not trace_names and not metric_names:
        return pipeline

    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()
    if trace_names:
        _build_traces(pipeline, trace_names, resource)
    if metric_names:
        _build_metrics(pipeline, metric_names, resource)
    if pipeline.has_providers or pipeline.prometheus_server is not None:
        pipeline.spare = _SpareWorker()
    if pipeline.description:
        logger.info("asyncdiag: exporting %s", "; ".join(pipeline.description))
    return pipeline


def _build_traces(pipeline: Pipeline, names: list[str], resource: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    processors: list[CountingBatchSpanProcessor] = []
    for name in names:
        cls = _load("traces", name)
        if cls is None:
            continue
        try:
            exporter = cls()
            if not isinstance(exporter, SpanExporter):
                raise TypeError(f"{cls.__qualname__} is not a SpanExporter")
            processors.append(CountingBatchSpanProcessor(exporter))
            pipeline.exporters.append(exporter)
        except Exception as exc:
            logger.warning("asyncdiag: span exporter %r could not be built: %r", name, exc)
            continue
        pipeline.description.append(f"spans via {name}")
    if not processors:
        return
    # The sampler comes from OTEL_TRACES_SAMPLER/_ARG inside the SDK (sampler=None).
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for processor in processors:
        provider.add_span_processor(processor)
    pipeline.tracer_provider = provider
    pipeline.span_processors = processors


def _build_metrics(pipeline: Pipeline, names: list[str], resource: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricReader,
        PeriodicExportingMetricReader,
    )

    readers: list[Any] = []
    for name in names:
        try:
            if name == PROMETHEUS:
                reader = _prometheus_reader(pipeline)
                if reader is not None:
                    readers.append(reader)
                continue
            cls = _load("metrics", name)
            if cls is None:
                continue
            if issubclass(cls, MetricReader):
                readers.append(cls())
            elif issubclass(cls, MetricExporter):
                # Interval and export timeout: OTEL_METRIC_EXPORT_INTERVAL/_TIMEOUT.
                exporter = cls()
                readers.append(PeriodicExportingMetricReader(exporter))
                pipeline.exporters.append(exporter)
            else:
                raise TypeError(f"{cls.__qualname__} is not a metric exporter")
        except Exception as exc:
            logger.warning("asyncdiag: metric exporter %r could not be built: %r", name, exc)
            continue
        pipeline.description.append(f"metrics via {name}")
    if not readers:
        return
    pipeline.meter_provider = MeterProvider(
        metric_readers=readers, resource=resource, shutdown_on_exit=False
    )
