"""``_loops.running_loop``: the running-loop lookup the instrumentation uses on every
cancellable ``__aexit__`` and traced block. On 3.10/3.11 it is the C extension's, which reads
asyncio's own state without asyncio's ``getpid()`` call; it must answer exactly as
``asyncio._get_running_loop`` does, in every place a loop can be running or not."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable

import pytest

from asyncdiag import _loops

speedups = pytest.importorskip("asyncdiag._speedups")

OLD_ASYNCIO = sys.version_info < (3, 12)


def test_the_c_lookup_is_the_one_used_where_asyncio_checks_the_pid() -> None:
    if OLD_ASYNCIO:
        assert _loops.running_loop is speedups.running_loop
    else:
        # 3.12+ checks the pid at fork time: asyncio's own function is as cheap.
        assert not hasattr(speedups, "running_loop")
        assert _loops.running_loop is asyncio.events._get_running_loop


def test_agrees_with_asyncio_outside_inside_and_after_a_loop(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    seen: list[tuple[object, object]] = [(_loops.running_loop(), asyncio._get_running_loop())]

    async def main() -> None:
        seen.append((_loops.running_loop(), asyncio._get_running_loop()))
        await asyncio.sleep(0)
        seen.append((_loops.running_loop(), asyncio.get_running_loop()))

    loop = loop_factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    seen.append((_loops.running_loop(), asyncio._get_running_loop()))
    assert seen[0] == (None, None)
    assert seen[1][0] is loop and seen[1][1] is loop
    assert seen[2][0] is loop
    assert seen[3] == (None, None)


def test_each_thread_sees_its_own_loop() -> None:
    found: dict[str, object] = {}

    def in_thread() -> None:
        async def main() -> None:
            found["thread"] = _loops.running_loop()
            found["thread_loop"] = asyncio.get_running_loop()

        asyncio.run(main())

    async def main() -> None:
        thread = threading.Thread(target=in_thread)
        thread.start()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        found["main"] = _loops.running_loop()
        found["main_loop"] = asyncio.get_running_loop()

    asyncio.run(main())
    assert found["thread"] is found["thread_loop"]
    assert found["main"] is found["main_loop"]
    assert found["thread"] is not found["main"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
# Threads left by earlier tests make 3.12+ warn about fork(); the child only writes to a pipe
# and leaves with os._exit, so none of their locks is ever needed there.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_does_not_see_its_parents_loop() -> None:
    """asyncio's fork check: a child forked while a loop runs has no running loop. The C
    lookup refreshes its pid in the child (pthread_atfork); without that it would return the
    parent's loop here."""

    async def main() -> int:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, and leave without running any cleanup
            answer = b"%d%d" % (_loops.running_loop() is None, asyncio._get_running_loop() is None)
            os.write(write_end, answer)
            os._exit(0)
        os.close(write_end)
        answer = os.read(read_end, 16)
        os.close(read_end)
        os.waitpid(pid, 0)
        assert _loops.running_loop() is asyncio.get_running_loop()
        return int(answer.decode(), 2)

    assert asyncio.run(main()) == 0b11
