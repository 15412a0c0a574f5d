"""The asyncgen tracker's own cost and memory, measured precisely on a shared machine.

    python benchmarks/bench_asyncgens.py cpu [--runs 31] [--loop asyncio|uvloop] [--sections ...]
    python benchmarks/bench_asyncgens.py instructions [--loop asyncio|uvloop]
    python benchmarks/bench_asyncgens.py memory [--generators 1000000] [--loop ...]

``cpu`` times the generator sections of ``sections_asyncgens.py`` with *process CPU time*
(``time.process_time``: other processes on a loaded machine do not inflate it, unlike the
wall clock of ``run.py``) under four variants, alternated run by run: ``plain``, ``agent``
(``install(track_asyncgens=False)``: every other component), ``tracker`` (the default
install) and ``tracker_python`` (the default install with the C first-iteration hook
disabled: what a build without a C compiler runs). It prints medians of the per-run ratios;
``tracker/agent`` is the tracker's share alone.

``instructions`` counts what ``cpu`` times, with valgrind (``apt-get install valgrind``; a
few minutes per loop): CPU time on a shared machine moves by 5-15 % between identical runs,
instruction counts do not. Each count is the main thread's (``--separate-threads``), and the
difference between a workload run at N and 2N (generators, or section repetitions) divided by
N, so start-up, install and loop creation cancel out. It prints instructions per generator of
a tight first-iteration loop (``asyncgen_tiny``'s shape) for each variant, and each section's
``tracker/plain`` and ``agent/plain`` in instructions. Instructions are not time (cycles per
instruction differ, system calls and cache misses are not in it): use it to compare versions
of the hook.

``memory`` churns N generators (a quarter orphaned, a quarter closed with ``aclose()``, half
exhausted) on one loop with the agent installed, and prints RSS and tracemalloc-free process
memory before and after, the registry size and the folded finding's count.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import pathlib
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
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
VARIANTS = ("plain", "agent", "tracker", "tracker_python")


@contextmanager
def installed(variant: str) -> Iterator[None]:
    """The agent as ``variant`` has it: ``plain`` none, ``agent`` without the tracker,
    ``tracker`` the default install, ``tracker_python`` the same with the C first-iteration
    hook disabled (what a build without a C compiler runs)."""
    if variant == "plain":
        yield
        return
    import asyncdiag
    from asyncdiag import _asyncgens

    c_hook = _asyncgens._CFirstIterHook
    if variant == "tracker_python":
        _asyncgens._CFirstIterHook = None
    asyncdiag.install(exporter="none", track_asyncgens=(variant != "agent"))
    try:
        yield
    finally:
        asyncdiag.uninstall()
        _asyncgens._CFirstIterHook = c_hook


def factory_for(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def time_once(body: Callable[[], Coroutine[Any, Any, None]], variant: str, kind: str) -> float:
    gc.collect()
    with installed(variant):
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
    return elapsed


def cpu(runs: int, kind: str, sections: list[str]) -> None:
    print(f"# Python {sys.version.split()[0]}, {kind}, {runs} runs, process CPU time, "
          "medians of per-run ratios")
    print("| section | plain ms (median) | agent/plain | tracker/plain | tracker/agent | "
          "tracker_python/agent |")
    print("|---|---|---|---|---|---|")
    for name in sections:
        body = SECTIONS[name]
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for v in VARIANTS:
            time_once(body, v, kind)  # warm-up
        for run in range(runs):
            shift = run % len(VARIANTS)
            for v in VARIANTS[shift:] + VARIANTS[:shift]:
                times[v].append(time_once(body, v, kind))

        def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

        print(f"| {name} | {statistics.median(times['plain']) * 1000:.1f} | "
              f"{ratio('agent', 'plain'):.3f} | {ratio('tracker', 'plain'):.3f} | "
              f"{ratio('tracker', 'agent'):.3f} | {ratio('tracker_python', 'agent'):.3f} |",
              flush=True)


def run_child(variant: str, kind: str, workload: str, count: int) -> None:
    """In the valgrind child: one workload, ``count`` times (generators or section runs)."""
    with installed(variant):
        loop = factory_for(kind)()
        asyncio.set_event_loop(loop)
        try:
            if workload == "generators":
                loop.run_until_complete(first_iterations(1000))  # warm-up: caches, specialising
                gc.collect()
                gc.freeze()  # later collections do not rescan start-up objects N-dependently
                loop.run_until_complete(first_iterations(count))
            else:
                body = SECTIONS[workload]
                loop.run_until_complete(body())
                gc.collect()
                gc.freeze()
                for _ in range(count):
                    loop.run_until_complete(body())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def _item(value: int) -> AsyncIterator[int]:
    yield value


async def first_iterations(n: int) -> None:
    for i in range(n):
        async for _ in _item(i):
            pass


def count_instructions(variant: str, kind: str, workload: str, count: int) -> int:
    # Under valgrind the workload is one long loop step, 50x slower: with the default
    # thresholds the watchdog would sample it and the heartbeat would run far more often per
    # generator than at full speed. Neither changes what a first iteration executes.
    env = {**os.environ, "PYTHONHASHSEED": "0", "ASYNCDIAG_SLOW_CALLBACK_MS": "60000",
           "ASYNCDIAG_BLOCKED_MS": "600000"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", "--separate-threads=yes",
             f"--callgrind-out-file={out}", sys.executable, __file__, "child", variant, kind,
             workload, str(count)],
            capture_output=True, text=True, check=False, env=env,
        )
        main_thread = pathlib.Path(out + "-01")
        found = (re.search(r"^totals: (\d+)", main_thread.read_text(), re.MULTILINE)
                 if main_thread.exists() else None)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"{variant} {workload}: valgrind run failed:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def instructions(kind: str, generators: int) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    print(f"# Python {sys.version.split()[0]}, {kind}, instructions (main thread, valgrind)")
    per_gen = {}
    for v in VARIANTS:
        per_gen[v] = (count_instructions(v, kind, "generators", 2 * generators)
                      - count_instructions(v, kind, "generators", generators)) / generators
        print(f"first iteration loop, {v:8} {per_gen[v]:8.0f} instructions per generator",
              flush=True)
    print(f"tracker's own cost (tracker - agent): {per_gen['tracker'] - per_gen['agent']:.0f} "
          "instructions per generator; with the Python hook: "
          f"{per_gen['tracker_python'] - per_gen['agent']:.0f}")
    print("| section | plain (M instructions per run) | agent/plain | tracker/plain |")
    print("|---|---|---|---|")
    for name in ("asyncgen_stream", "asyncgen_many"):
        per_run = {v: (count_instructions(v, kind, name, 3)
                       - count_instructions(v, kind, name, 1)) / 2
                   for v in ("plain", "agent", "tracker")}
        print(f"| {name} | {per_run['plain'] / 1e6:.1f} | "
              f"{per_run['agent'] / per_run['plain']:.3f} | "
              f"{per_run['tracker'] / per_run['plain']:.3f} |", flush=True)


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
    if sys.argv[1:2] == ["child"]:
        variant, kind, workload, count = sys.argv[2:6]
        run_child(variant, kind, workload, int(count))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("cpu", "instructions", "memory"))
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="cpu: comma-separated, from " + ", ".join(SECTIONS))
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--generators", type=int, default=None,
                        help="memory: 1,000,000 by default; instructions: 20,000")
    args = parser.parse_args()
    if args.mode == "cpu":
        sections = [name.strip() for name in args.sections.split(",") if name.strip()]
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            parser.error(f"unknown sections: {', '.join(unknown)}")
        cpu(args.runs, args.loop, sections)
    elif args.mode == "instructions":
        instructions(args.loop, args.generators or 20_000)
    else:
        memory(args.generators or 1_000_000, args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
