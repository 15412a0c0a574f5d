"""asyncdiag with the benchmark's context managers and generators instrumented: metrics only
(spans sampled off, the production setting), and every operation traced."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from _registry import LoopFactory, env, variant

TARGETS = (
    "sections_core:Resource",
    "sections_core:_numbers",
    "sections_instrumentation:Tight",
    "sections_instrumentation:tight_items",
)


def _providers() -> tuple[Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class DropExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()  # sampler from OTEL_TRACES_SAMPLER
    tracer_provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    return tracer_provider, MeterProvider(metric_readers=[InMemoryMetricReader()])


def _instrumented(factory: LoopFactory, sampler: str) -> Iterator[LoopFactory]:
    import asyncdiag
    from asyncdiag import _telemetry

    with env(OTEL_TRACES_SAMPLER=sampler):
        tracer_provider, meter_provider = _providers()
    _telemetry.use_providers(tracer_provider, meter_provider)
    asyncdiag.install(instrument=TARGETS, exporter="none")
    try:
        yield factory
    finally:
        asyncdiag.uninstall()
        tracer_provider.shutdown()
        meter_provider.shutdown()


@variant("instr_metrics", "asyncdiag, benchmark CMs/generators instrumented, spans off",
         order=40)
def instr_metrics(factory: LoopFactory) -> Iterator[LoopFactory]:
    yield from _instrumented(factory, "always_off")


@variant("instr_traced", "asyncdiag, benchmark CMs/generators instrumented, every op traced",
         order=50)
def instr_traced(factory: LoopFactory) -> Iterator[LoopFactory]:
    yield from _instrumented(factory, "always_on")
