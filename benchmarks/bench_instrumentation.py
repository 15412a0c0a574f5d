"""Cost of instrumenting an ``async with`` and an async generator item, in microseconds.

    python benchmarks/bench_instrumentation.py [--rounds 9] [--loop asyncio|uvloop]
                                               [--python-hot-paths]

Each round measures, on a fresh loop and in this one process (so the ratios share the
machine's noise):

* ``plain``: an uninstrumented class / generator, with the agent installed (so only the
  instrumentation's own cost is counted, not the other detectors');
* two kinds of context manager: ``Resource``, whose ``__aexit__`` never awaits (a lock's or
  a pool's release), and ``AwaitingResource``, whose ``__aenter__``/``__aexit__`` each await
  a coroutine (that completes at once, so the loop is not involved). Only the second can
  receive a cancellation in ``__aexit__``, so only there is the current task looked up and
  its cancellation count compared (on 3.10/3.11 that lookup is a ``getpid()`` system call
  inside asyncio's ``get_running_loop``);
* ``metrics``: the same code instrumented, metrics aggregated for an SDK MeterProvider, spans
  not sampled (``OTEL_TRACES_SAMPLER=always_off``);
* ``traced``: instrumented, every operation traced (``always_on``) through a
  ``BatchSpanProcessor`` to an exporter that drops the batch;
* ``sdk_span``: no instrumentation; the loop body starts a span with the same SDK tracer
  provider, makes it current around the ``async with``, detaches and ends it: the SDK's own
  cost for one span, which the traced instrumentation must stay within 1.25x of. It runs
  under the same (traced) agent as ``traced`` and both are taken relative to a plain
  ``async with`` under that agent, so that the ratio compares like with like.

Budgets (issue 5): metrics <= 2 us per ``async with`` and <= 0.3 us per item; traced <= 1.25x
the SDK's span cost. The medians of the per-round differences are printed and, with
``--json``, written out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

WITH_OPS = 20_000
ITEMS = 200_000
# "batch": a BatchSpanProcessor, as a service would run (the default). "simple": spans are
# handed to the exporter as they end, in the loop's thread; count_instructions.py uses it,
# because with a batch worker thread the number of spans alive at each garbage collection
# depends on thread timing, which moves the count per operation by several thousand
# instructions from run to run.
PROCESSOR = "batch"
# CPU time of the loop thread by default: on a shared, loaded machine wall-clock time also
# counts the time the thread waited for a CPU, which inflates everything unevenly.
CLOCK = time.thread_time


class PlainResource:
    async def __aenter__(self) -> PlainResource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class Resource:
    async def __aenter__(self) -> Resource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def _released() -> None:
    return None


class PlainAwaitingResource:
    async def __aenter__(self) -> PlainAwaitingResource:
        await _released()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await _released()


class AwaitingResource:
    async def __aenter__(self) -> AwaitingResource:
        await _released()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await _released()


async def plain_items(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


async def items(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


TARGETS = (f"{__name__}:Resource", f"{__name__}:AwaitingResource", f"{__name__}:items")


async def with_loop(cls: type, n: int) -> float:
    started = CLOCK()
    for _ in range(n):
        async with cls():
            pass
    return CLOCK() - started


async def item_loop(factory: Callable[[int], AsyncIterator[int]], n: int) -> float:
    started = CLOCK()
    async for _ in factory(n):
        pass
    return CLOCK() - started


async def sdk_span_loop(tracer: Any, n: int, attributes: bool = False) -> float:
    """The SDK alone: a span made current around the block. With ``attributes``, the same
    attributes the instrumentation puts on its span (the SDK validates each one, which costs
    about a tenth of a span apiece on this machine)."""
    from opentelemetry import context, trace

    started = CLOCK()
    for _ in range(n):
        span = tracer.start_span(
            "async with PlainResource",
            attributes={"asyncdiag.subject": "bench.PlainResource"} if attributes else None,
        )
        token = context.attach(trace.set_span_in_context(span))
        async with PlainResource():
            pass
        context.detach(token)
        if attributes:
            span.set_attributes({"asyncdiag.outcome": "ok", "asyncdiag.enter.duration": 1e-6,
                                 "asyncdiag.exit.duration": 1e-6})
        span.end()
    return CLOCK() - started


def _providers(sampler: str) -> tuple[Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class DropExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    previous = os.environ.get("OTEL_TRACES_SAMPLER")
    os.environ["OTEL_TRACES_SAMPLER"] = sampler
    try:
        tracer_provider = TracerProvider()  # the sampler comes from the environment
    finally:
        if previous is None:
            del os.environ["OTEL_TRACES_SAMPLER"]
        else:
            os.environ["OTEL_TRACES_SAMPLER"] = previous
    processor = SimpleSpanProcessor if PROCESSOR == "simple" else BatchSpanProcessor
    tracer_provider.add_span_processor(processor(DropExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return tracer_provider, meter_provider


@contextmanager
def agent(sampler: str) -> Iterator[tuple[Any, Any]]:
    import asyncdiag
    from asyncdiag import _telemetry

    tracer_provider, meter_provider = _providers(sampler)
    _telemetry.use_providers(tracer_provider, meter_provider)
    asyncdiag.install(instrument=TARGETS, exporter="none")
    try:
        yield tracer_provider, meter_provider
    finally:
        asyncdiag.uninstall()
        tracer_provider.shutdown()
        meter_provider.shutdown()


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> float:
    loop = loop_factory()
    try:
        return float(loop.run_until_complete(coro))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _measure(loop_factory: Callable[[], asyncio.AbstractEventLoop],
             workloads: dict[str, tuple[Callable[[], Any], int]], reverse: bool,
             ) -> dict[str, float]:
    """Each workload once, in the given order or reversed (alternate rounds take the other:
    a workload measured first pays for whatever the ones before it leave behind), in
    microseconds per operation."""
    names = list(workloads)
    if reverse:
        names.reverse()
    result = {}
    for name in names:
        make, ops = workloads[name]
        result[name] = run(loop_factory, make()) / ops * 1e6
    return result


def one_round(loop_factory: Callable[[], asyncio.AbstractEventLoop], index: int = 0,
              ) -> dict[str, float]:
    r: dict[str, float] = {}
    reverse = index % 2 == 1
    with agent("always_off") as (_, meter_provider):
        r.update(_measure(loop_factory, {
            "plain_with": (lambda: with_loop(PlainResource, WITH_OPS), WITH_OPS),
            "metrics_with": (lambda: with_loop(Resource, WITH_OPS), WITH_OPS),
            "plain_awaiting_with": (
                lambda: with_loop(PlainAwaitingResource, WITH_OPS), WITH_OPS),
            "metrics_awaiting_with": (lambda: with_loop(AwaitingResource, WITH_OPS), WITH_OPS),
            "plain_item": (lambda: item_loop(plain_items, ITEMS), ITEMS),
            "metrics_item": (lambda: item_loop(items, ITEMS), ITEMS),
        }, reverse))
        meter_provider.force_flush()  # collection happens off the measured path
    # Traced, and the SDK's own span for reference, under the same agent and through the same
    # tracer provider and batch processor: the ratio compares like with like.
    with agent("always_on") as (tracer_provider, _):
        tracer = tracer_provider.get_tracer("bench")
        # Unmeasured warm-up: a new provider's first few thousand spans grow the heap and fill
        # the batch queue; whichever workload ran first used to pay for it.
        run(loop_factory, with_loop(Resource, WITH_OPS // 10))
        run(loop_factory, sdk_span_loop(tracer, WITH_OPS // 10))
        r.update(_measure(loop_factory, {
            "plain_with_traced_agent": (lambda: with_loop(PlainResource, WITH_OPS), WITH_OPS),
            "traced_with": (lambda: with_loop(Resource, WITH_OPS), WITH_OPS),
            "sdk_span_with": (lambda: sdk_span_loop(tracer, WITH_OPS), WITH_OPS),
            "sdk_span_attrs_with": (
                lambda: sdk_span_loop(tracer, WITH_OPS, attributes=True), WITH_OPS),
            "traced_item": (lambda: item_loop(items, ITEMS), ITEMS),
        }, reverse))
    return r


def use_python_hot_paths() -> None:
    import asyncio.events

    from asyncdiag import _proxies, _telemetry

    for owner, name, value in _proxies.python_hot_paths():
        setattr(owner, name, value)
    # The tests compare these two with their C versions in their own fixtures.
    _proxies._record_since = _telemetry._record_since_python
    _proxies._get_running_loop = asyncio.events._get_running_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--json", default="")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: the loop thread's CPU time (default); wall: perf_counter")
    parser.add_argument("--python-hot-paths", action="store_true",
                        help="the Python versions of the C extension's hot paths, as an install "
                             "without a C compiler runs")
    args = parser.parse_args()
    if args.python_hot_paths:
        use_python_hot_paths()
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.loop == "uvloop":
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        loop_factory = asyncio.new_event_loop
    run(loop_factory, with_loop(PlainResource, 1000))  # warm-up
    rounds = [one_round(loop_factory, index) for index in range(args.rounds)]

    def median(f: Callable[[dict[str, float]], float]) -> float:
        return statistics.median(f(r) for r in rounds)

    result = {
        "python": sys.version.split()[0],
        "loop": args.loop,
        "rounds": args.rounds,
        "clock": args.clock,
        "hot_paths": "python" if args.python_hot_paths else "c (where built)",
        "plain_async_with_us": median(lambda r: r["plain_with"]),
        "plain_item_us": median(lambda r: r["plain_item"]),
        "metrics_added_per_async_with_us": median(lambda r: r["metrics_with"] - r["plain_with"]),
        "metrics_added_per_awaiting_async_with_us": median(
            lambda r: r["metrics_awaiting_with"] - r["plain_awaiting_with"]
        ),
        "metrics_added_per_item_us": median(lambda r: r["metrics_item"] - r["plain_item"]),
        "traced_added_per_async_with_us": median(
            lambda r: r["traced_with"] - r["plain_with_traced_agent"]
        ),
        "traced_added_per_item_us": median(lambda r: r["traced_item"] - r["plain_item"]),
        "sdk_span_cost_us": median(lambda r: r["sdk_span_with"] - r["plain_with_traced_agent"]),
        "traced_over_sdk_span": median(
            lambda r: (r["traced_with"] - r["plain_with_traced_agent"])
            / (r["sdk_span_with"] - r["plain_with_traced_agent"])
        ),
        "sdk_span_same_attributes_cost_us": median(
            lambda r: r["sdk_span_attrs_with"] - r["plain_with_traced_agent"]
        ),
        "traced_over_sdk_span_same_attributes": median(
            lambda r: (r["traced_with"] - r["plain_with_traced_agent"])
            / (r["sdk_span_attrs_with"] - r["plain_with_traced_agent"])
        ),
    }
    result["budgets_met"] = {
        "metrics_async_with<=2us": result["metrics_added_per_async_with_us"] <= 2.0,
        "metrics_awaiting_async_with<=2us": (
            result["metrics_added_per_awaiting_async_with_us"] <= 2.0
        ),
        "metrics_item<=0.3us": result["metrics_added_per_item_us"] <= 0.3,
        "traced<=1.25x_sdk_span": result["traced_over_sdk_span"] <= 1.25,
    }
    for key, value in result.items():
        print(f"{key:40} {value:.3f}" if isinstance(value, float) else f"{key:40} {value}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
