"""Per-call cost of the Telemetry recording methods (the detectors' hot paths).

    python benchmarks/micro_telemetry.py

Prints the median µs per call of each method next to one OpenTelemetry SDK
``Histogram.record`` / ``Counter.add`` measured in the same run (the machine is shared, so
compare ratios, not absolute numbers).
"""

from __future__ import annotations

import statistics
import sys
import timeit

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from asyncdiag import _names
from asyncdiag._telemetry import Telemetry

NUMBER = 200_000
REPEAT = 7


def per_call_us(stmt: str, namespace: dict[str, object], number: int = NUMBER) -> float:
    runs = timeit.repeat(stmt, globals=namespace, number=number, repeat=REPEAT)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    telemetry = Telemetry()
    provider = MeterProvider([InMemoryMetricReader()])
    meter = provider.get_meter("bench")
    histogram = meter.create_histogram(
        "h", unit="s", explicit_bucket_boundaries_advisory=list(_names.DURATION_BUCKETS)
    )
    counter = meter.create_counter("c")
    attrs = {_names.ATTR_SUBJECT: "myapp.db.Pool"}
    ns: dict[str, object] = {"t": telemetry, "h": histogram, "c": counter, "attrs": attrs,
                             "s": telemetry.enter_series("myapp.db.Pool")}
    rows = [
        ("empty call baseline", "t._observe_tasks", NUMBER),
        # What the instrumented async with does inline with the series its Site holds.
        ("series append (inline)",
         "s.append(0.00042)\nif len(s) >= s.limit: s.histogram.fold(s)", NUMBER),
        ("record_enter", "t.record_enter('myapp.db.Pool', 0.00042)", NUMBER),
        ("record_exit", "t.record_exit('myapp.db.Pool', 'ok', 0.00042)", NUMBER),
        ("record_next", "t.record_next('myapp.streams.rows', 0.00042)", NUMBER),
        ("add_yields", "t.add_yields('myapp.streams.rows')", NUMBER),
        ("record_item", "t.record_item('myapp.streams.rows', 0.00042)", NUMBER),
        ("asyncgen_active", "t.asyncgen_active(1)", NUMBER),
        ("record_loop_lag", "t.record_loop_lag(0.0021)", NUMBER),
        ("SDK Histogram.record", "h.record(0.00042, attrs)", NUMBER // 10),
        ("SDK Counter.add", "c.add(1, attrs)", NUMBER // 10),
    ]
    results = {name: per_call_us(stmt, ns, n) for name, stmt, n in rows}
    sdk = results["SDK Histogram.record"]
    print(f"python {sys.version.split()[0]}; median of {REPEAT} runs")
    for name, us in results.items():
        print(f"  {name:24s} {us:7.3f} µs/call   ({us / sdk:5.1%} of one SDK histogram record)")
    pair = results["record_enter"] + results["record_exit"]
    print(f"  enter+exit per `async with`: {pair:.3f} µs; per yielded item "
          f"(record_next + add_yields): {results['record_next'] + results['add_yields']:.3f} µs"
          f", (record_item): {results['record_item']:.3f} µs")


if __name__ == "__main__":
    main()
