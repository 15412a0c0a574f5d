"""``asyncdiag demo``: a small service that commits each classic async mistake once per round.

Every class and generator here is opted in with ``@asyncdiag.instrument`` so the demo works
the same whether the agent was started by this command, by ``ASYNCDIAG_ENABLED=1`` or by
``asyncdiag run``. Each mistake is a few lines a reader can match with the report.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import AsyncIterator
from types import TracebackType

import asyncdiag

from . import _config, _lifecycle

# Each mistake is made just past the installed agent's threshold, so the demo shows it whatever
# thresholds are in force (e.g. under ASYNCDIAG_ENABLED=1, where the agent is installed before
# the demo can apply its own short defaults). Set by main().
_blocking_call_seconds = 0.12
_teardown_seconds = 0.25

# Short thresholds so that one round takes a few seconds; an explicit option or environment
# variable still wins.
_DEMO_DEFAULTS = {
    _config.ENV_SLOW_CALLBACK_MS: "50",
    _config.ENV_BLOCKED_MS: "500",
    _config.ENV_SLOW_TEARDOWN_MS: "100",
}


@asyncdiag.instrument
class SlowConnection:
    """Mistake: a blocking call inside ``__aenter__`` (stalls every other task)."""

    async def __aenter__(self) -> SlowConnection:
        time.sleep(_blocking_call_seconds)  # a synchronous DNS lookup / driver call, in real life
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


@asyncdiag.instrument
class ForgivingTransaction:
    """Mistake: ``__aexit__`` returns True, so every error in the block vanishes."""

    async def __aenter__(self) -> ForgivingTransaction:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return True


@asyncdiag.instrument
class StubbornLock:
    """Mistake: ``__aexit__`` swallows ``CancelledError``, so the task cannot be cancelled."""

    async def __aenter__(self) -> StubbornLock:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return exc_type is asyncio.CancelledError


@asyncdiag.instrument
class SlowPool:
    """Mistake: teardown that takes far longer than it should (blocks shutdown)."""

    async def __aenter__(self) -> SlowPool:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.sleep(_teardown_seconds)


@asyncdiag.instrument
async def paginated_stream(pages: int) -> AsyncIterator[int]:
    """A well-behaved generator; the mistake is in how ``abandon_generator`` uses it."""
    for page in range(pages):
        await asyncio.sleep(0)
        yield page


async def blocking_call_in_aenter() -> None:
    async with SlowConnection():
        pass


async def abandon_generator() -> None:
    async for page in paginated_stream(10):
        if page == 2:
            break  # no aclose(), no aclosing(): left for the garbage collector


async def swallow_exception() -> None:
    async with ForgivingTransaction():
        raise ValueError("this error is silently lost")


async def swallow_cancellation() -> None:
    async def worker() -> None:
        async with StubbornLock():
            await asyncio.sleep(10)
        await asyncio.sleep(0)

    task = asyncio.ensure_future(worker())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.wait([task], timeout=1)


async def slow_teardown() -> None:
    async with SlowPool():
        pass


async def never_await() -> None:
    asyncio.sleep(0)  # type: ignore[unused-coroutine]  # the mistake: missing await
    gc.collect()


async def unretrieved_exception() -> None:
    async def fails() -> None:
        raise RuntimeError("nobody looks at this task's result")

    task = asyncio.ensure_future(fails())
    await asyncio.sleep(0.01)
    del task
    gc.collect()


async def destroy_pending_task() -> None:
    loop = asyncio.get_running_loop()

    async def waits_forever() -> None:
        await loop.create_future()

    task = loop.create_task(waits_forever())
    await asyncio.sleep(0)
    del task  # the only strong reference: the task is collected while pending
    gc.collect()


async def block_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # a stall long enough for the watchdog to see it live


async def one_round(block_seconds: float) -> None:
    steps = [
        ("blocking call in __aenter__", blocking_call_in_aenter()),
        ("async generator abandoned without aclose()", abandon_generator()),
        ("__aexit__ that swallows an exception", swallow_exception()),
        ("__aexit__ that swallows cancellation", swallow_cancellation()),
        ("slow teardown in __aexit__", slow_teardown()),
        ("coroutine never awaited", never_await()),
        ("task exception never retrieved", unretrieved_exception()),
        ("task destroyed while pending", destroy_pending_task()),
        (f"loop blocked for {block_seconds:.1f} s", block_the_loop(block_seconds)),
    ]
    for title, step in steps:
        print(f"demo: {title}", file=sys.stderr, flush=True)
        await step
        await asyncio.sleep(0.05)
    gc.collect()
    await asyncio.sleep(0.05)


async def service(rounds: int, interval: float, block_seconds: float) -> None:
    done = 0
    while rounds == 0 or done < rounds:
        await one_round(block_seconds)
        done += 1
        if rounds == 0 or done < rounds:
            await asyncio.sleep(interval)


def main(rounds: int = 1, interval: float = 1.0) -> int:
    for name, value in _DEMO_DEFAULTS.items():
        os.environ.setdefault(name, value)
    global _blocking_call_seconds, _teardown_seconds
    agent = _lifecycle.current() or asyncdiag.install()
    block_seconds = agent.config.blocked_threshold * 1.5 + 0.1
    _blocking_call_seconds = agent.config.slow_callback_duration * 1.2 + 0.02
    _teardown_seconds = agent.config.slow_teardown_threshold * 1.5 + 0.02
    print(
        "asyncdiag demo: a small service commits each classic asyncio mistake"
        f" ({'forever' if rounds == 0 else f'{rounds} round(s)'});"
        " asyncdiag reports them below.",
        file=sys.stderr, flush=True,
    )
    try:
        asyncio.run(service(rounds, interval, block_seconds))
    except KeyboardInterrupt:
        pass
    return 0
