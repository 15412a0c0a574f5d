"""Instructions per instrumented operation, counted by valgrind (deterministic on a busy machine).

    python benchmarks/count_instructions.py [--ops 3000]

CPU time on a shared machine varies by 10-30 % from run to run; instruction counts do not
(the same binary, inputs and environment give the same count whatever else the machine
does). Each workload of ``bench_instrumentation.py`` runs under ``valgrind --tool=callgrind``
twice, with N and 2N operations; the difference divided by N is the count per operation, free
of start-up and install costs. Instructions are not time: a system call (asyncio's
``get_running_loop`` makes one on 3.10/3.11) costs time and almost no user-space
instructions, and code differs in instructions per cycle. Use it to compare variants and to
see where a change helps, and ``bench_instrumentation.py`` for the time.

Needs valgrind (``apt-get install valgrind``). Takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import re
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent

# name -> (sampler, workload)
WORKLOADS = {
    "plain_with": ("always_off", "with:PlainResource"),
    "metrics_with": ("always_off", "with:Resource"),
    "plain_awaiting_with": ("always_off", "with:PlainAwaitingResource"),
    "metrics_awaiting_with": ("always_off", "with:AwaitingResource"),
    "plain_item": ("always_off", "items:plain_items"),
    "metrics_item": ("always_off", "items:items"),
    "plain_with_traced_agent": ("always_on", "with:PlainResource"),
    "traced_with": ("always_on", "with:Resource"),
    "sdk_span_with": ("always_on", "sdk_span"),
}


def run_one(name: str, ops: int) -> None:
    """In the valgrind child: install the agent as the benchmark does and run ``ops``."""
    sys.path.insert(0, str(HERE))
    import bench_instrumentation as bench

    sampler, workload = WORKLOADS[name]
    bench.PROCESSOR = "simple"  # deterministic counts (see bench_instrumentation.PROCESSOR)
    with bench.agent(sampler) as (tracer_provider, _):
        kind, _, target = workload.partition(":")
        if kind == "with":
            coro = bench.with_loop(getattr(bench, target), ops)
        elif kind == "items":
            coro = bench.item_loop(getattr(bench, target), ops)
        else:
            coro = bench.sdk_span_loop(tracer_provider.get_tracer("bench"), ops)
        bench.run(asyncio.new_event_loop, coro)


def count(name: str, ops: int) -> int:
    # Under valgrind a run takes 50x longer, and the whole run is one long step of the loop:
    # with the default thresholds the watchdog thread would sample and report it throughout,
    # and its instructions (counted with every thread's) would swamp the operation's. They
    # do not change what an instrumented operation executes.
    env = {**os.environ, "ASYNCDIAG_SLOW_CALLBACK_MS": "60000", "ASYNCDIAG_BLOCKED_MS": "600000"}
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--child", name, "--ops", str(ops)],
        capture_output=True, text=True, check=False, env=env,
    )
    found = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"{name}: valgrind run failed:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        run_one(args.child, args.ops)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    per_op: dict[str, float] = {}
    for name, (_, workload) in WORKLOADS.items():
        ops = args.ops * 20 if workload.startswith("items") else args.ops
        per_op[name] = (count(name, 2 * ops) - count(name, ops)) / ops
        print(f"{name:26} {per_op[name]:10.0f} instructions per operation", flush=True)
    added = {
        "metrics, per async with": per_op["metrics_with"] - per_op["plain_with"],
        "metrics, per awaiting async with": (
            per_op["metrics_awaiting_with"] - per_op["plain_awaiting_with"]
        ),
        "metrics, per item": per_op["metrics_item"] - per_op["plain_item"],
        "traced, per async with": per_op["traced_with"] - per_op["plain_with_traced_agent"],
        "SDK span": per_op["sdk_span_with"] - per_op["plain_with_traced_agent"],
    }
    print(f"python {sys.version.split()[0]}")
    for label, value in added.items():
        print(f"added {label:34} {value:10.0f}")
    print(f"traced / SDK span {added['traced, per async with'] / added['SDK span']:.3f}")


if __name__ == "__main__":
    main()
