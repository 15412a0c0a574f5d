"""The core workload: the patterns a real asyncio service repeats all day."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from _registry import section

# Sized so that one run takes roughly 50-200 ms on a shared 2-core machine.
ASYNC_WITH_ITERATIONS = 8_000
ASYNCGEN_ITEMS = 200_000
GATHER_TASKS = 5_000
ECHO_ROUND_TRIPS = 1_000
ECHO_CONNECTIONS = 4


class Resource:
    """A pool-like async context manager: a lock, a counter, an await on each side."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.in_use = 0

    async def __aenter__(self) -> Resource:
        await self._lock.acquire()
        self.in_use += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.in_use -= 1
        self._lock.release()


@section("async_with", "many `async with` over a shared resource, from 10 tasks")
async def async_with() -> None:
    resource = Resource()

    async def worker(n: int) -> None:
        for _ in range(n):
            async with resource:
                await asyncio.sleep(0)

    await asyncio.gather(*(worker(ASYNC_WITH_ITERATIONS // 10) for _ in range(10)))


async def _numbers(count: int) -> AsyncIterator[int]:
    for i in range(count):
        if i % 64 == 0:
            await asyncio.sleep(0)
        yield i


@section("asyncgen", "one long async generator consumed with `async for`")
async def asyncgen() -> None:
    total = 0
    async for value in _numbers(ASYNCGEN_ITEMS):
        total += value
    if total != ASYNCGEN_ITEMS * (ASYNCGEN_ITEMS - 1) // 2:
        raise AssertionError("wrong sum")


@section("gather", "thousands of short tasks gathered, each awaiting a few times")
async def gather() -> None:
    async def job(i: int) -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return i

    results = await asyncio.gather(*(job(i) for i in range(GATHER_TASKS)))
    if len(results) != GATHER_TASKS:
        raise AssertionError("lost results")


@section("tcp_echo", "request/response over TCP on 127.0.0.1 (asyncio streams)")
async def tcp_echo() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = b"x" * 100 + b"\n"
        for _ in range(ECHO_ROUND_TRIPS // ECHO_CONNECTIONS):
            writer.write(payload)
            await writer.drain()
            if await reader.readline() != payload:
                raise AssertionError("echo mismatch")
        writer.close()
        await writer.wait_closed()

    async with server:
        await asyncio.gather(*(client() for _ in range(ECHO_CONNECTIONS)))
