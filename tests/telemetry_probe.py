"""A small program for the end-to-end telemetry tests, run in a subprocess.

    python telemetry_probe.py MODE

MODE ``env``: the agent comes from ASYNCDIAG_ENABLED=1 and every exporter setting from OTEL_*
environment variables only. ``app``: the program sets its own global SDK providers (exporting
to $PROBE_ENDPOINT over gRPC) before ``asyncdiag.install()``. ``late``: the agent starts first
(ASYNCDIAG_ENABLED=1, no exporter of its own) and the program sets its providers afterwards.
``serve``: like ``env``, then prints READY and waits for stdin to close (Prometheus scrape).

The program records every metric of the contract through the agent's Telemetry, opens a span
under which a finding is reported, and prints one JSON line of facts on stdout. Arguments and
messages carry a credential-shaped string that must never be exported or logged.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

SECRET = "db://user:s3cr3t-probe@db.internal:5432/app"
SUBJECT = "probe.Pool"
ROWS = "probe.rows"
ENTERS = 50
SPANS = int(os.environ.get("PROBE_SPANS", "20"))


def app_providers() -> tuple[object, object]:
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = os.environ["PROBE_ENDPOINT"]
    resource = Resource.create({"probe.app": "own-providers"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))
    )
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=endpoint, insecure=True), export_interval_millis=200
    )
    meter_provider = MeterProvider(metric_readers=[reader], resource=resource)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return tracer_provider, meter_provider


class Resource:
    """Holds a DSN, as a real pool would; it must not show up in telemetry."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn


async def work(telemetry: object) -> None:
    from asyncdiag import _findings, _names

    t: object = telemetry
    loop = asyncio.get_running_loop()

    def tasks() -> list[tuple[int, dict[str, str]]]:
        return [(len(asyncio.all_tasks(loop)), {})]

    t.add_task_count_source(tasks)  # type: ignore[attr-defined]
    tracer = t.tracer  # type: ignore[attr-defined]
    Resource(SECRET)
    with tracer.start_as_current_span(_names.async_with_span_name(SUBJECT)):
        for i in range(ENTERS):
            t.record_enter(SUBJECT, 0.0001 * (i + 1))  # type: ignore[attr-defined]
            t.record_exit(SUBJECT, "ok", 0.0002)  # type: ignore[attr-defined]
        t.record_exit(SUBJECT, "error", 0.003)  # type: ignore[attr-defined]
        _findings.report(
            _names.SLOW_TEARDOWN, f"{SUBJECT}.__aexit__ took 0.60 s", SUBJECT,
            location="probe.py:42", duration=0.6,
        )
    for _ in range(SPANS):
        with tracer.start_as_current_span(_names.async_for_span_name(ROWS)):
            pass
    for _ in range(5):
        t.record_next(ROWS, 0.001)  # type: ignore[attr-defined]
    t.add_yields(ROWS, 5)  # type: ignore[attr-defined]
    t.asyncgen_active(1)  # type: ignore[attr-defined]
    t.record_loop_lag(0.002)  # type: ignore[attr-defined]
    t.record_slow_callback(0.2)  # type: ignore[attr-defined]
    await asyncio.sleep(float(os.environ.get("PROBE_SLEEP", "0.2")))


async def mistakes_with_secrets() -> None:
    """Every detector's mistake, with the credential in arguments, attributes and exception
    messages (where a careless agent would copy it from)."""
    import gc

    import asyncdiag

    @asyncdiag.instrument
    class Pool:
        def __init__(self, dsn: str) -> None:
            self.dsn = dsn

        async def __aenter__(self) -> Pool:
            time.sleep(0.12)  # blocks the loop: slow_callback
            return self

        async def __aexit__(self, *exc: object) -> bool:
            await asyncio.sleep(0.25)  # slow_teardown
            return True  # swallows the error below: swallowed_exception

    @asyncdiag.instrument
    async def rows(dsn: str) -> Any:
        for i in range(5):
            await asyncio.sleep(0)
            yield f"{dsn}/{i}"

    async with Pool(SECRET):
        raise ConnectionError(f"cannot reach {SECRET}")
    async for _row in rows(SECRET):
        break  # orphaned_asyncgen
    async def query(dsn: str) -> None:
        raise RuntimeError(f"query failed on {dsn}")

    query(SECRET)  # type: ignore[unused-coroutine]  # never_awaited
    task = asyncio.ensure_future(query(SECRET))
    await asyncio.sleep(0.01)
    del task  # unretrieved_exception
    gc.collect()
    await asyncio.sleep(0.05)
    gc.collect()


def run(coro: Any) -> None:
    """``asyncio.run``, on uvloop when PROBE_LOOP=uvloop."""
    if os.environ.get("PROBE_LOOP") == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(coro)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
    else:
        asyncio.run(coro)


def main() -> int:
    mode = sys.argv[1]
    if mode == "secrets":
        import logging

        # asyncdiag's own log records, as text (message, stack and exception), for the test.
        handler = logging.FileHandler(os.environ["PROBE_LOG"])
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logging.getLogger("asyncdiag").addHandler(handler)
        import asyncdiag

        run(mistakes_with_secrets())
        print(json.dumps({"findings": [f.describe() for f in asyncdiag.findings()],
                          "stacks": ["".join(f.stack) for f in asyncdiag.findings()]}))
        return 0
    providers = app_providers() if mode == "app" else None

    import asyncdiag
    from asyncdiag import _lifecycle

    preinstalled = _lifecycle.current() is not None
    agent = _lifecycle.current() or asyncdiag.install()
    if mode == "late":
        providers = app_providers()
    telemetry = agent.telemetry
    started = time.perf_counter()
    run(work(telemetry))
    elapsed = time.perf_counter() - started
    facts = {
        "elapsed": elapsed,
        "own_pipeline": telemetry._pipeline is not None,
        "preinstalled": preinstalled,
        "findings": [f.describe() for f in asyncdiag.findings()],
    }
    print(json.dumps(facts), flush=True)
    if mode == "serve":
        print("READY", flush=True)
        sys.stdin.read()
    if providers is not None:
        for provider in providers:
            provider.shutdown()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
