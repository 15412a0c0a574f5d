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


STREAM_CONNECTIONS = 4
STREAM_REQUESTS_PER_CONNECTION = 250
STREAM_ROWS = 16


async def _stream_rows(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: int
) -> AsyncIterator[bytes]:
    """One request, its rows streamed back: what a database or RPC client generator does."""
    writer.write(b"%d\n" % count)
    await writer.drain()
    for _ in range(count):
        yield await reader.readline()


@section("asyncgen_stream", "1,000 requests over 4 TCP connections on 127.0.0.1, each "
         "response's 16 rows consumed through a fresh async generator")
async def asyncgen_stream() -> None:
    row = b"r" * 64 + b"\n"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await reader.readline():
                writer.write(row * int(request))
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def client() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        received = 0
        for n in range(STREAM_REQUESTS_PER_CONNECTION):
            rows = _stream_rows(reader, writer, STREAM_ROWS)
            if n % 2:
                async for line in rows:
                    received += len(line)
            else:
                async with contextlib.aclosing(rows) as closing:
                    async for line in closing:
                        received += len(line)
        writer.close()
        await writer.wait_closed()
        return received

    async with server:
        totals = await asyncio.gather(*(client() for _ in range(STREAM_CONNECTIONS)))
    if sum(totals) != len(row) * STREAM_ROWS * STREAM_REQUESTS_PER_CONNECTION * len(totals):
        raise AssertionError("lost rows")


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
