"""Generator-heavy workloads: the first-iteration hook runs once per generator, so these are
the sections where orphan tracking (``track_asyncgens``) costs the most.

Run ``python benchmarks/run.py --sections asyncgen_many,asyncgen_tiny --variants
plain,asyncdiag,asyncdiag_no_asyncgens``: the ratio between the last two columns is the share
of the asyncgen tracker alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

from _registry import LoopFactory, section, variant

# Sized so that one run takes roughly 100-300 ms on a shared 2-core machine.
MANY_WORKERS = 10
MANY_GENERATORS_PER_WORKER = 600
MANY_ITEMS = 16
TINY_GENERATORS = 20_000


async def _rows(count: int) -> AsyncIterator[int]:
    """A cursor-like generator: an await (the next page) every few rows, cleanup at the end."""
    try:
        for i in range(count):
            if i % 4 == 0:
                await asyncio.sleep(0)
            yield i
    finally:
        pass


@section("asyncgen_many", "10 tasks, each consuming 600 short generators (16 items, an await "
         "every 4), closed by exhaustion, aclosing() or aclose()")
async def asyncgen_many() -> None:
    async def worker() -> int:
        total = 0
        for n in range(MANY_GENERATORS_PER_WORKER):
            kind = n % 3
            if kind == 0:
                async for value in _rows(MANY_ITEMS):
                    total += value
            elif kind == 1:
                async with contextlib.aclosing(_rows(MANY_ITEMS)) as rows:
                    async for value in rows:
                        total += value
                        if value == MANY_ITEMS // 2:
                            break
            else:
                rows = _rows(MANY_ITEMS)
                total += await rows.__anext__()
                await rows.aclose()
        return total

    totals = await asyncio.gather(*(worker() for _ in range(MANY_WORKERS)))
    if len(totals) != MANY_WORKERS:
        raise AssertionError("lost a worker")


async def _one(value: int) -> AsyncIterator[int]:
    yield value


@section("asyncgen_tiny", "worst case: 20,000 one-item generators in a tight loop, no await "
         "(per-generator overhead with nothing else to amortise it)")
async def asyncgen_tiny() -> None:
    total = 0
    for i in range(TINY_GENERATORS):
        async for value in _one(i):
            total += value
    if total != TINY_GENERATORS * (TINY_GENERATORS - 1) // 2:
        raise AssertionError("wrong sum")


@variant("asyncdiag_no_asyncgens", "asyncdiag.install(track_asyncgens=False): every "
         "component but the asyncgen tracker", order=25)
def asyncdiag_no_asyncgens(factory: LoopFactory) -> Iterator[LoopFactory]:
    import asyncdiag

    asyncdiag.install(exporter="none", track_asyncgens=False)
    try:
        yield factory
    finally:
        asyncdiag.uninstall()
