"""Run the asyncdiag benchmark: per section, the cost of each variant relative to plain asyncio.

    python benchmarks/run.py [--loop asyncio|uvloop|both] [--runs N] [--sections a,b]
                             [--variants plain,debug,asyncdiag] [--clock wall|cpu]
                             [--json FILE]

Every ``sections_*.py`` and ``variants_*.py`` module in this directory is imported and registers
itself (see ``_registry.py`` and README.md). Each run times every variant once on a fresh loop,
in an order rotated from run to run so that drift on a noisy machine (CPU frequency, neighbours)
spreads evenly; the ratio of a variant is the median over runs of ``variant time / plain time``
measured in the same run. ``--clock cpu`` times with ``time.process_time()`` (CPU of every
thread of the process, so a variant's background threads are charged to it) instead of wall
time: on a shared machine it is far less disturbed by neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import pathlib
import platform
import statistics
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _registry import REGISTRY, LoopFactory, Section, Variant  # noqa: E402

BASELINE = "plain"


def discover() -> None:
    for pattern in ("sections_*.py", "variants_*.py"):
        for path in sorted(HERE.glob(pattern)):
            importlib.import_module(path.stem)


def loop_factory(kind: str) -> LoopFactory:
    if kind == "uvloop":
        import uvloop

        factory: LoopFactory = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


CLOCK = time.perf_counter


def time_once(section: Section, variant: Variant, kind: str) -> float:
    """One timed run of ``section`` under ``variant``; set-up and tear-down are not timed."""
    gc.collect()
    with variant.factory(loop_factory(kind)) as factory:
        loop = factory()
        try:
            asyncio.set_event_loop(loop)
            start = CLOCK()
            loop.run_until_complete(section.body())
            elapsed = CLOCK() - start
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
    return elapsed


def measure(
    section: Section, variants: list[Variant], kind: str, runs: int
) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for v in variants:  # warm-up: imports, caches, first-time SDK set-up
        time_once(section, v, kind)
    for run in range(runs):
        shift = run % len(variants)
        for v in variants[shift:] + variants[:shift]:
            times[v.name].append(time_once(section, v, kind))
    base = times[BASELINE]
    result: dict[str, dict[str, float]] = {}
    for v in variants:
        ratios = [t / b for t, b in zip(times[v.name], base, strict=True)]
        result[v.name] = {
            "median_s": statistics.median(times[v.name]),
            "ratio": statistics.median(ratios),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    discover()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="both")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--sections", default="", help="comma-separated; default: all")
    parser.add_argument("--variants", default="", help="comma-separated; default: all")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default) or CPU time of the whole process")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--list", action="store_true", help="list sections and variants")
    args = parser.parse_args(argv)

    if args.list:
        for s in REGISTRY.sections.values():
            print(f"section  {s.name:<22} {s.description}")
        for v in sorted(REGISTRY.variants.values(), key=lambda v: v.order):
            print(f"variant  {v.name:<22} {v.description}")
        return 0

    def pick(raw: str, known: dict[str, Any], what: str) -> list[str]:
        names = [n.strip() for n in raw.split(",") if n.strip()] or list(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
        return names

    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    section_names = pick(args.sections, REGISTRY.sections, "sections")
    variant_names = pick(args.variants, REGISTRY.variants, "variants")
    if BASELINE not in variant_names:
        variant_names.insert(0, BASELINE)
    variants = sorted((REGISTRY.variants[n] for n in variant_names), key=lambda v: v.order)
    kinds = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]

    print(f"# Python {platform.python_version()} on {platform.machine()}, "
          f"{args.runs} runs, {args.clock} clock, median ratio to '{BASELINE}' measured in "
          "the same run")
    results: dict[str, Any] = {"python": platform.python_version(), "runs": args.runs,
                               "clock": args.clock, "loops": {}}
    for kind in kinds:
        header = f"| section ({kind}) | {BASELINE} ms | " + " | ".join(
            v.name for v in variants if v.name != BASELINE) + " |"
        print()
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        per_section: dict[str, Any] = {}
        for name in section_names:
            section = REGISTRY.sections[name]
            res = measure(section, variants, kind, args.runs)
            per_section[name] = res
            cells = [f"{res[BASELINE]['median_s'] * 1000:.1f}"] + [
                f"{res[v.name]['ratio']:.3f}" for v in variants if v.name != BASELINE
            ]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        results["loops"][kind] = per_section
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
