"""Loop health on real loops (asyncio and uvloop): slow steps with the blocking line, the
loop-blocked watchdog, asyncio's own warnings as findings."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import asyncdiag
from _support import run_on
from asyncdiag import _findings

HERE = __file__
SLOW = 0.05  # slow_callback_duration used by the tests
BLOCK = 0.2  # how long the guilty steps block

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def line_of(marker: str) -> int:
    with open(HERE) as f:
        for number, line in enumerate(f, 1):
            if marker in line and "line_of(" not in line:
                return number
    raise AssertionError(marker)


def of_kind(kind: str) -> list[_findings.Finding]:
    return [f for f in asyncdiag.findings() if f.kind == kind]


def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def install(**kwargs: Any) -> asyncdiag.Agent:
    options: dict[str, Any] = {"slow_callback_duration": SLOW, "blocked_threshold": 5.0,
                               "exporter": "none"}
    options.update(kwargs)
    return asyncdiag.install(**options)


def slow_findings_settled() -> list[_findings.Finding]:
    # The watchdog reports once it has seen the step end: at most a couple of polls later.
    wait_for(lambda: bool(of_kind("slow_callback")), timeout=1.0)
    return of_kind("slow_callback")


class BlockingResource:
    async def __aenter__(self) -> BlockingResource:
        time.sleep(BLOCK)  # BLOCKING-AENTER
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def test_blocking_line_in_aenter(loop_factory: LoopFactory) -> None:
    install()

    async def main() -> None:
        await asyncio.sleep(0.03)
        async with BlockingResource():
            pass
        await asyncio.sleep(0.03)

    run_on(loop_factory, main())
    found = slow_findings_settled()
    assert len(found) == 1, found
    finding = found[0]
    assert finding.location == f"{HERE}:{line_of('BLOCKING-AENTER')}"
    assert finding.subject.endswith("main")
    assert finding.task is not None and finding.task.startswith("Task-")
    assert finding.duration is not None and BLOCK * 0.8 <= finding.duration <= BLOCK + 0.15
    assert any("time.sleep(BLOCK)" in line for line in finding.stack)
    assert not of_kind("loop_blocked")


def test_blocking_line_in_plain_task(loop_factory: LoopFactory) -> None:
    install()

    async def blocker() -> None:
        await asyncio.sleep(0)
        time.sleep(BLOCK)  # BLOCKING-TASK

    async def main() -> None:
        await asyncio.sleep(0.03)
        await asyncio.create_task(blocker(), name="the-blocker")
        await asyncio.sleep(0.03)

    run_on(loop_factory, main())
    (finding,) = slow_findings_settled()
    assert finding.location == f"{HERE}:{line_of('BLOCKING-TASK')}"
    assert finding.task == "the-blocker"
    assert finding.subject.endswith("blocker")


def test_blocking_line_in_call_soon_callback(loop_factory: LoopFactory) -> None:
    install()

    def callback() -> None:
        time.sleep(BLOCK)  # BLOCKING-CALLBACK

    async def main() -> None:
        await asyncio.sleep(0.03)
        asyncio.get_running_loop().call_soon(callback)
        await asyncio.sleep(0.05)

    run_on(loop_factory, main())
    (finding,) = slow_findings_settled()
    assert finding.location == f"{HERE}:{line_of('BLOCKING-CALLBACK')}"
    assert finding.task is None
    assert finding.subject.endswith("callback")
    assert finding.duration is not None and finding.duration >= BLOCK * 0.8


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
def test_eager_task_first_step_is_attributed_to_the_child(loop_factory: LoopFactory) -> None:
    if "uvloop" in getattr(loop_factory, "__module__", ""):
        pytest.skip("uvloop's create_task does not accept eager_start")
    install()

    async def child() -> None:
        time.sleep(BLOCK)  # BLOCKING-EAGER
        await asyncio.sleep(0)

    main_task_name: list[str] = []

    async def main() -> None:
        main_task_name.append(asyncio.current_task().get_name())  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        await asyncio.sleep(0.03)
        await asyncio.create_task(child(), name="eager-child")
        await asyncio.sleep(0.03)

    run_on(loop_factory, main())
    (finding,) = slow_findings_settled()
    assert finding.location == f"{HERE}:{line_of('BLOCKING-EAGER')}"
    # The child's own step, although it ran inside its parent's (asyncio names an eager task
    # after its first step, hence no check of the name).
    assert finding.subject.endswith("child")
    assert finding.task is not None and finding.task != main_task_name[0]


def test_loop_blocked_is_reported_while_the_loop_is_still_stuck(
    loop_factory: LoopFactory,
) -> None:
    install(blocked_threshold=0.1)
    started = threading.Event()
    released = threading.Event()

    async def main() -> None:
        await asyncio.sleep(0.03)
        started.set()
        deadline = time.monotonic() + 3.0
        while not released.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)  # BLOCKING-HANG

    worker = threading.Thread(target=run_on, args=(loop_factory, main()), name="loop-worker")
    worker.start()
    try:
        assert started.wait(2)
        # Seen from the main thread while the loop thread is still hanging.
        assert wait_for(lambda: bool(of_kind("loop_blocked")), timeout=2.0)
        assert worker.is_alive() and not released.is_set()
        time.sleep(0.3)  # many polls later: still one report for this stall
        (finding,) = of_kind("loop_blocked")
        assert finding.count == 1
        assert finding.location == f"{HERE}:{line_of('BLOCKING-HANG')}"
        assert "loop-worker" in finding.message
        assert any("time.sleep(0.01)" in line for line in finding.stack)
        assert finding.duration is not None and finding.duration >= 0.1
    finally:
        released.set()
        worker.join(5)
    (slow,) = slow_findings_settled()
    # At least the 0.3 s slept after the report, minus any time the thread waited for a CPU.
    assert slow.duration is not None and slow.duration >= 0.2


@pytest.mark.parametrize("chunks", [False, True], ids=["many-tasks", "back-to-back-steps"])
def test_no_finding_for_many_short_steps(loop_factory: LoopFactory, chunks: bool) -> None:
    # Generous, so that a neighbour stealing the CPU for a while on a shared machine does not
    # make one of the short steps genuinely slow.
    threshold = 0.2
    install(slow_callback_duration=threshold)

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    async def short(i: int) -> None:
        for _ in range(3):
            spin(0.00002)
            await asyncio.sleep(0)

    async def chunked() -> None:
        # Each step stays under the threshold; two back to back exceed it.
        for _ in range(4):
            spin(threshold * 0.6)
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.sleep(0.03)
        if chunks:
            await chunked()
            return
        # Batches of thousands of ready steps delay the loop, but no step is slow. (Tasks are
        # created 200 at a time: creating thousands in one step is itself a slow step.)
        tasks = []
        for i in range(3000):
            tasks.append(asyncio.ensure_future(short(i)))
            if i % 200 == 0:
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)

    run_on(loop_factory, main())
    time.sleep(0.1)
    assert not of_kind("slow_callback")
    assert not of_kind("loop_blocked")


def test_watchdog_thread_ends_with_its_loop_and_after_uninstall(
    loop_factory: LoopFactory,
) -> None:
    agent = install()
    monitor: Any = agent.component("loop monitor")

    async def main() -> None:
        await asyncio.sleep(0.05)
        assert monitor.watchdog.thread is not None and monitor.watchdog.thread.is_alive()

    worker = threading.Thread(target=run_on, args=(loop_factory, main()))
    worker.start()
    worker.join(5)
    assert wait_for(lambda: monitor.watchdog.thread is None)
    assert not [t for t in threading.enumerate() if t.name == "asyncdiag-watchdog"]

    async def again() -> None:
        await asyncio.sleep(0.05)

    loop = loop_factory()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(again())
    thread = monitor.watchdog.thread
    assert thread is not None and thread.is_alive()
    asyncdiag.uninstall()
    assert not thread.is_alive()
    asyncio.set_event_loop(None)
    loop.close()


def test_monitoring_keeps_no_loop_alive(loop_factory: LoopFactory) -> None:
    import weakref

    install()

    async def main() -> None:
        await asyncio.sleep(0.05)

    loop = loop_factory()
    ref = weakref.ref(loop)
    asyncio.set_event_loop(loop)
    loop.run_until_complete(main())
    asyncio.set_event_loop(None)
    loop.close()
    del loop
    gc.collect()
    assert ref() is None


def test_app_exception_handler_still_called_and_findings_made(
    loop_factory: LoopFactory,
) -> None:
    install()
    seen: list[str] = []

    def app_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        seen.append(context["message"])

    async def fails() -> None:
        raise ValueError("boom")  # RAISES-HERE

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(app_handler)
        # The watchdog wraps a handler set after start-up (within 16 polls).
        deadline = time.monotonic() + 3.0
        while loop.get_exception_handler() is app_handler and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task = loop.create_task(fails())
        await asyncio.sleep(0.01)
        del task
        gc.collect()
        await asyncio.sleep(0.01)

    run_on(loop_factory, main())
    assert "Task exception was never retrieved" in seen
    (finding,) = of_kind("unretrieved_exception")
    assert finding.location == f"{HERE}:{line_of('RAISES-HERE')}"
    assert finding.subject.endswith("fails")


def test_pending_task_destroyed(loop_factory: LoopFactory, caplog: Any) -> None:
    install()

    async def forever() -> None:  # DEFINED-HERE
        await asyncio.Event().wait()  # SUSPENDED-HERE

    async def main() -> None:
        asyncio.get_running_loop().create_task(forever())
        await asyncio.sleep(0.01)
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run_on(loop_factory, main())
        gc.collect()
    found = of_kind("pending_task_destroyed")
    assert found, asyncdiag.findings()
    # Where it was suspended, or (when a GC cycle finalized the coroutine first) where defined.
    assert found[0].location in (f"{HERE}:{line_of('SUSPENDED-HERE')}",
                                 f"{HERE}:{line_of('DEFINED-HERE')}")
    # Decision: asyncio's own report is kept (default handler), the finding adds the location.
    assert any("Task was destroyed but it is pending" in r.getMessage() for r in caplog.records)


def test_never_awaited_points_at_the_line(loop_factory: LoopFactory) -> None:
    install()

    async def fetch() -> int:
        return 1

    async def main() -> None:
        fetch()  # type: ignore[unused-coroutine]  # NOT-AWAITED

    with pytest.warns(RuntimeWarning, match="was never awaited"):
        run_on(loop_factory, main())
        gc.collect()
    (finding,) = of_kind("never_awaited")
    assert finding.location == f"{HERE}:{line_of('NOT-AWAITED')}"
    assert finding.subject.endswith("fetch")


def test_debug_mode_log_becomes_the_same_finding(
    loop_factory: LoopFactory, caplog: Any
) -> None:
    install(debug=True)

    async def main() -> None:
        await asyncio.sleep(0.03)
        time.sleep(BLOCK)  # BLOCKING-DEBUG
        await asyncio.sleep(0.05)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        run_on(loop_factory, main())
        time.sleep(0.1)
    assert not [r for r in caplog.records
                if r.name == "asyncio" and r.getMessage().startswith("Executing")]
    (finding,) = slow_findings_settled()
    assert finding.count == 1
    assert finding.location == f"{HERE}:{line_of('BLOCKING-DEBUG')}"
    assert "asyncio debug mode" in finding.message
    assert finding.duration is not None and finding.duration >= BLOCK


def test_task_count_source(loop_factory: LoopFactory) -> None:
    agent = install()
    counts: list[int] = []

    async def main() -> None:
        waiters = [asyncio.ensure_future(asyncio.sleep(1)) for _ in range(7)]
        await asyncio.sleep(0.05)
        for source in agent.telemetry._task_sources:
            counts.extend(count for count, _ in source())
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)

    run_on(loop_factory, main())
    assert 8 in counts  # seven sleepers and main


def test_uninstall_restores_exception_handler(loop_factory: LoopFactory) -> None:
    import warnings

    original_hook = warnings._warn_unawaited_coroutine  # type: ignore[attr-defined]
    install()

    def app_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        pass

    loop = loop_factory()
    loop.set_exception_handler(app_handler)
    asyncio.set_event_loop(loop)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert loop.get_exception_handler() is not app_handler
    asyncdiag.uninstall()
    assert loop.get_exception_handler() is app_handler
    assert warnings._warn_unawaited_coroutine is original_hook  # type: ignore[attr-defined]
    asyncio.set_event_loop(None)
    loop.close()


def test_several_loops_in_several_threads(loop_factory: LoopFactory) -> None:
    agent = install()
    monitor: Any = agent.component("loop monitor")
    watchdogs: set[int] = set()

    async def first() -> None:
        await asyncio.sleep(0.03)
        time.sleep(BLOCK)  # BLOCKING-THREAD-1
        await asyncio.sleep(0.03)

    async def second() -> None:
        await asyncio.sleep(0.03)
        watchdogs.update(id(t) for t in threading.enumerate() if t.name == "asyncdiag-watchdog")
        time.sleep(BLOCK)  # BLOCKING-THREAD-2
        await asyncio.sleep(0.03)

    workers = [threading.Thread(target=run_on, args=(loop_factory, coro()))
               for coro in (first, second)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(5)
    assert wait_for(lambda: len(of_kind("slow_callback")) == 2)
    locations = {f.location for f in of_kind("slow_callback")}
    assert locations == {f"{HERE}:{line_of('BLOCKING-THREAD-1')}",
                         f"{HERE}:{line_of('BLOCKING-THREAD-2')}"}
    assert len(watchdogs) == 1  # one thread serves every loop
    assert wait_for(lambda: monitor.watchdog.thread is None)


def test_loop_lag_metric_comes_from_the_heartbeat(
    loop_factory: LoopFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncdiag import _telemetry

    lags: list[float] = []
    slow: list[float] = []
    monkeypatch.setattr(_telemetry.Telemetry, "record_loop_lag",
                        lambda self, seconds: lags.append(seconds))
    monkeypatch.setattr(_telemetry.Telemetry, "record_slow_callback",
                        lambda self, seconds: slow.append(seconds))
    install()

    async def main() -> None:
        await asyncio.sleep(0.1)
        time.sleep(BLOCK)
        await asyncio.sleep(0.1)

    run_on(loop_factory, main())
    slow_findings_settled()
    assert len(lags) >= 3  # a beat every poll (10 ms here) while the loop ran
    assert all(lag >= 0 for lag in lags)
    assert max(lags) >= BLOCK * 0.5  # the beat posted during the block waited for it
    assert sorted(lags)[len(lags) // 2] < SLOW  # a healthy loop has a small median lag
    assert len(slow) == 1 and slow[0] >= BLOCK * 0.8


def test_debug_mode_finding_carries_no_callback_arguments(loop_factory: LoopFactory) -> None:
    install(debug=True)
    secret = "s3cr3t-token-value"

    def send(token: str) -> None:
        time.sleep(BLOCK)

    async def main() -> None:
        await asyncio.sleep(0.03)
        asyncio.get_running_loop().call_soon(send, secret)
        await asyncio.sleep(0.05)

    run_on(loop_factory, main())
    (finding,) = slow_findings_settled()
    assert finding.subject.endswith("send")
    text = " ".join([finding.message, finding.subject, *finding.stack])
    assert secret not in text


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Task.get_context() is 3.12+")
def test_loop_blocked_event_lands_on_the_blocking_tasks_span(loop_factory: LoopFactory) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    install(blocked_threshold=0.1)

    async def handler() -> None:
        with tracer.start_as_current_span("request"):
            await asyncio.sleep(0.03)
            time.sleep(0.3)  # BLOCKING-IN-SPAN
        await asyncio.sleep(0.03)

    run_on(loop_factory, handler())
    slow_findings_settled()
    (span,) = exporter.get_finished_spans()
    from asyncdiag import _names

    kinds = [event.attributes.get(_names.EVENT_ATTR_KIND) for event in span.events
             if event.attributes is not None]
    assert "loop_blocked" in kinds
    provider.shutdown()


def test_first_step_of_a_run_blocking_at_once(loop_factory: LoopFactory) -> None:
    install()

    async def main() -> None:
        time.sleep(BLOCK)  # BLOCKING-FIRST-STEP
        await asyncio.sleep(0.05)

    run_on(loop_factory, main())
    (finding,) = slow_findings_settled()
    assert finding.location == f"{HERE}:{line_of('BLOCKING-FIRST-STEP')}"


def test_same_loop_run_again_from_another_call_site(loop_factory: LoopFactory) -> None:
    install()

    async def first() -> None:
        await asyncio.sleep(0.03)

    async def second() -> None:
        await asyncio.sleep(0.03)
        time.sleep(BLOCK)  # BLOCKING-SECOND-RUN
        await asyncio.sleep(0.03)

    loop = loop_factory()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(first())

        def run_again() -> None:  # a different frame runs the loop this time
            loop.run_until_complete(second())

        run_again()
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    (finding,) = slow_findings_settled()
    assert finding.location == f"{HERE}:{line_of('BLOCKING-SECOND-RUN')}"


def test_last_slow_step_of_a_run_is_in_findings_right_after_the_run(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """The watchdog judges a step at its next poll; findings() must not race it when read
    right after the run ended (the step that blocks is the last one of the run)."""
    asyncdiag.install(exporter="none", slow_callback_duration=0.05, blocked_threshold=5.0)

    async def main() -> None:
        time.sleep(0.12)
        await asyncio.sleep(0)
        time.sleep(0.12)  # the last step: the run ends right after it

    run_on(loop_factory, main())
    lines = sorted(f.location or "" for f in asyncdiag.findings() if f.kind == "slow_callback")
    assert len(lines) == 2, lines
    assert all(__file__ in line for line in lines)


def hop_through_lines(seconds: float) -> int:
    """Block for ``seconds`` moving through many distinct lines of this one frame, each as
    cheap as the next. Each calls a builtin: a thread hands the GIL over only at some
    instructions (calls, loop back-edges), so these are the lines another thread finds it on;
    and no Python call, so that the innermost frame stays this live one, whose line keeps
    changing."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n = abs(n - 9)
        n = max(n, 3)
        n = min(n, 1 << 20)
        n = int(n) ^ 0x55
        n = hash(n) & 0xFFFF
        n = abs(n + 7)
        n = max(n - 1, 0)
        n = min(n + 2, 1 << 16)
        n = int(n) | 1
        n = hash(n) + 3
        n = abs(n ^ 0x2A)
        n = max(n, 5) - 4
    return n


_FRAME_LINE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


def innermost_app_frame(stack: tuple[str, ...]) -> str | None:
    """``path:line`` of the innermost frame of this file in a formatted stack (outermost
    first): this file is the only application code the blocking steps run."""
    found = None
    for entry in stack:
        match = _FRAME_LINE.search(entry)
        if match is not None and match["file"] == HERE:
            found = f"{match['file']}:{match['line']}"
    return found


def test_location_is_the_innermost_line_of_the_findings_stack(
    loop_factory: LoopFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finding's location and its stack show the same moment of the loop thread, however
    far the thread has run on by the time the watchdog reports."""
    from asyncdiag import _watchdog

    # Between sampling the loop thread and reporting, the watchdog really lets the loop thread
    # run: the /proc read for the run-queue wait, and the thread-registry lock taken for the
    # thread's name (when contended). The stand-ins hand the GIL over for sure, the second
    # until the loop thread is on another line: a finding whose stack was read after it and
    # whose location before would then disagree every time, not by chance.
    real_wait, real_name = _watchdog._runqueue_wait, _watchdog._thread_name

    def wait_handing_off(native_id: int | None) -> int | None:
        time.sleep(0.002)
        return real_wait(native_id)

    def name_once_the_loop_moved_on(thread_id: int | None) -> str:
        frame = sys._current_frames().get(thread_id) if thread_id is not None else None
        if frame is not None:
            line = frame.f_lineno
            deadline = time.monotonic() + 0.5
            while frame.f_lineno == line and time.monotonic() < deadline:
                time.sleep(0.001)
        del frame
        return real_name(thread_id)

    monkeypatch.setattr(_watchdog, "_runqueue_wait", wait_handing_off)
    monkeypatch.setattr(_watchdog, "_thread_name", name_once_the_loop_moved_on)
    install(slow_callback_duration=0.05, blocked_threshold=0.1)

    async def main() -> None:
        # Several blocking steps, for several findings of each kind.
        for _ in range(3):
            await asyncio.sleep(0.03)
            hop_through_lines(0.25)
        await asyncio.sleep(0.03)

    run_on(loop_factory, main())
    wait_for(lambda: sum(f.count for f in of_kind("slow_callback")) >= 3)
    found = of_kind("slow_callback") + of_kind("loop_blocked")
    assert {f.kind for f in found} == {"slow_callback", "loop_blocked"}, found
    for finding in found:
        assert finding.location is not None and HERE in finding.location, finding
        assert finding.location == innermost_app_frame(finding.stack), (
            finding.kind, finding.location, finding.stack)
