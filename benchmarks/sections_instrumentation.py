"""Workloads where the instrumentation's own cost is most visible: an ``async with`` whose
``__aenter__``/``__aexit__`` do nothing, and a generator that only yields. The variants in
``variants_instrumentation.py`` instrument them (and ``sections_core``'s Resource/_numbers)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from _registry import section

TIGHT_WITH_ITERATIONS = 20_000
TIGHT_ITEMS = 200_000


class Tight:
    async def __aenter__(self) -> Tight:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def tight_items(count: int) -> AsyncIterator[int]:
    for i in range(count):
        yield i


@section("tight_async_with", "`async with` over a context manager that does nothing")
async def tight_async_with() -> None:
    for _ in range(TIGHT_WITH_ITERATIONS):
        async with Tight():
            pass


@section("tight_asyncgen", "`async for` over a generator that only yields")
async def tight_asyncgen() -> None:
    async for _ in tight_items(TIGHT_ITEMS):
        pass
