"""The asyncgen tracker's own cost and memory, measured precisely on a shared machine.

    python benchmarks/bench_asyncgens.py cpu [--runs 31] [--loop asyncio|uvloop]
    python benchmarks/bench_asyncgens.py memory [--generators 1000000] [--loop ...]

``cpu`` times the generator sections of ``sections_asyncgens.py`` with *process CPU time*
(``time.process_time``: other processes on a loaded machine do not inflate it, unlike the
wall clock of ``run.py``) under three variants, alternated run by run: ``plain``, ``agent``
(``install(track_asyncgens=False)``: every other component) and ``tracker`` (the default
install). It prints the median of the per-run ratios and the ratio of the minima (the most
stable estimate of a CPU-bound cost); ``tracker/agent`` is the tracker's share alone.

``memory`` churns N generators (a quarter orphaned, a quarter closed with ``aclose()``, half
exhausted) on one loop with the agent installed, and prints RSS and tracemalloc-free process
memory before and after, the registry size and the folded finding's count.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import pathlib
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sections_asyncgens  # noqa: E402

SECTIONS: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
    "asyncgen_stream": sections_asyncgens.asyncgen_stream,
    "asyncgen_many": sections_asyncgens.asyncgen_many,
    "asyncgen_tiny": sections_asyncgens.asyncgen_tiny,
}
VARIANTS = ("plain", "agent", "tracker")


def factory_for(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def time_once(body: Callable[[], Coroutine[Any, Any, None]], variant: str, kind: str) -> float:
    import asyncdiag

    gc.collect()
    if variant != "plain":
        asyncdiag.install(exporter="none", track_asyncgens=(variant == "tracker"))
    try:
        loop = factory_for(kind)()
        try:
            asyncio.set_event_loop(loop)
            start = time.process_time()
            loop.run_until_complete(body())
            elapsed = time.process_time() - start
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
    finally:
        asyncdiag.uninstall()
    return elapsed


def cpu(runs: int, kind: str) -> None:
    print(f"# Python {sys.version.split()[0]}, {kind}, {runs} runs, process CPU time")
    print("| section | plain ms (min) | agent/plain | tracker/plain | tracker/agent "
          "(median) | tracker/agent (min) |")
    print("|---|---|---|---|---|---|")
    for name, body in SECTIONS.items():
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for v in VARIANTS:
            time_once(body, v, kind)  # warm-up
        for run in range(runs):
            order = VARIANTS[run % 3:] + VARIANTS[:run % 3]
            for v in order:
                times[v].append(time_once(body, v, kind))

        def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

        print(f"| {name} | {min(times['plain']) * 1000:.1f} | {ratio('agent', 'plain'):.3f} | "
              f"{ratio('tracker', 'plain'):.3f} | {ratio('tracker', 'agent'):.3f} | "
              f"{min(times['tracker']) / min(times['agent']):.3f} |", flush=True)


def rss_kib() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def _one() -> AsyncIterator[int]:
    yield 1
    yield 2


async def churn(n: int) -> None:
    for i in range(n):
        agen = _one()
        await agen.__anext__()
        if i % 4 == 0:
            del agen  # orphaned: the loop's finalizer closes it later
        elif i % 4 == 1:
            await agen.aclose()
        else:
            async for _ in agen:
                pass
        if i % 256 == 0:
            await asyncio.sleep(0)


def memory(generators: int, kind: str) -> None:
    import logging

    import asyncdiag
    from asyncdiag import _lifecycle

    logging.getLogger("asyncdiag").setLevel(logging.ERROR)  # one line per power of ten
    asyncdiag.install(exporter="none")
    agent = _lifecycle.current()
    assert agent is not None
    tracker: Any = agent.component("asyncgen tracker")
    loop = factory_for(kind)()
    try:
        loop.run_until_complete(churn(20_000))  # warm-up
        gc.collect()
        before = rss_kib()
        start = time.perf_counter()
        for done in range(0, generators, 100_000):
            loop.run_until_complete(churn(min(100_000, generators - done)))
            loop.run_until_complete(asyncio.sleep(0))
            gc.collect()
            print(f"  {done + min(100_000, generators - done):>9,} generators: "
                  f"RSS {rss_kib():,} KiB, registry {len(tracker.registry)}", flush=True)
        elapsed = time.perf_counter() - start
        after = rss_kib()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    [finding] = [f for f in asyncdiag.findings() if f.kind == "orphaned_asyncgen"]
    asyncdiag.uninstall()
    print(f"{generators:,} generators on {kind} in {elapsed:.1f} s: RSS {before:,} -> "
          f"{after:,} KiB ({after - before:+,} KiB); orphans reported: {finding.count:,} "
          f"(one folded finding)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("cpu", "memory"))
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--generators", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.mode == "cpu":
        cpu(args.runs, args.loop)
    else:
        memory(args.generators, args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
