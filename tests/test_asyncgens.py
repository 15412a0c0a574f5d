"""Orphaned async generators (issue 4): findings, non-findings, hook chaining, shutdown.

Every test runs a real loop (asyncio and uvloop via ``loop_factory``); the autouse fixture in
conftest fails a test that leaves ``sys.get_asyncgen_hooks()`` (or anything else) changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import asyncdiag
from _support import run_on
from asyncdiag import _asyncgens, _lifecycle, _names
from asyncdiag._asyncgens import AsyncgenTracker

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

KIND = _names.ORPHANED_ASYNCGEN


def here() -> int:
    """The line number of the caller (so expected locations stay right when lines move)."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno


def orphans() -> list[asyncdiag.Finding]:
    gc.collect()
    return [f for f in asyncdiag.findings() if f.kind == KIND]


def tracker() -> AsyncgenTracker:
    agent = _lifecycle.current()
    assert agent is not None
    component = agent.component("asyncgen tracker")
    assert isinstance(component, AsyncgenTracker)
    return component


def installed_firstiter() -> Any:
    """This thread's first-iteration hook as installed (asyncdiag's, wrapping the loop's):
    ``sys.get_asyncgen_hooks()`` answers with the loop's own."""
    return tracker()._orig_get().firstiter


cleanups: list[str] = []


async def numbers(n: int = 3) -> AsyncIterator[int]:
    try:
        for i in range(n):
            await asyncio.sleep(0)
            yield i
    finally:
        cleanups.append("numbers")


@pytest.fixture(autouse=True)
def _fresh() -> None:
    cleanups.clear()


@pytest.fixture(autouse=True, params=["C", "Python"])
def hook_implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with both first-iteration hooks used under a loop's own hooks: the C one
    (``_speedups.c``, what a build with a compiler uses) and its Python equivalent."""
    if request.param == "C":
        if _asyncgens._CFirstIterHook is None:
            pytest.skip("asyncdiag._speedups is not built (see test_c_hook_is_built)")
    else:
        monkeypatch.setattr(_asyncgens, "_CFirstIterHook", None)
    return str(request.param)


# -- positive cases -------------------------------------------------------------------------


def test_break_out_of_async_for_is_reported_with_line_and_task(loop_factory: LoopFactory) -> None:
    asyncdiag.install(exporter="none")
    lines: list[int] = []

    async def consume() -> None:
        lines.append(here() + 1)
        async for value in numbers():
            if value == 1:
                break

    async def main() -> None:
        await asyncio.create_task(consume(), name="consumer-7")

    run_on(loop_factory, main())
    [finding] = orphans()
    assert finding.subject == "numbers"
    assert finding.location == f"{__file__}:{lines[0]}"
    assert finding.task == "consumer-7"
    assert "garbage-collected" in finding.message and "never closed" in finding.message
    assert f"{__file__}:" in finding.message  # where the generator function is defined
    assert finding.count == 1
    # The loop's own finalizer hook still ran: it closed the generator.
    assert cleanups == ["numbers"]


def test_first_anext_call_site_is_the_location(loop_factory: LoopFactory) -> None:
    asyncdiag.install(exporter="none")
    lines: list[int] = []

    async def main() -> None:
        agen = numbers()
        lines.append(here() + 1)
        assert await agen.__anext__() == 0
        assert await agen.__anext__() == 1
        del agen

    run_on(loop_factory, main())
    [finding] = orphans()
    assert finding.location == f"{__file__}:{lines[0]}"


def test_orphan_in_a_reference_cycle_is_reported_when_collected(
    loop_factory: LoopFactory,
) -> None:
    asyncdiag.install(exporter="none")
    lines: list[int] = []

    class Holder:
        pass

    async def main() -> None:
        gc.disable()  # only the explicit collection below may free the cycle
        try:
            await cycle()
        finally:
            gc.enable()

    async def cycle() -> None:
        holder = Holder()
        holder.self = holder  # type: ignore[attr-defined]
        holder.agen = numbers()  # type: ignore[attr-defined]
        lines.append(here() + 1)
        await anext(holder.agen)  # type: ignore[attr-defined]
        del holder  # unreachable now, but only the cycle collector can free it
        assert [f for f in asyncdiag.findings() if f.kind == KIND] == []
        gc.collect()  # while the loop still runs: its finalizer schedules aclose()
        await asyncio.sleep(0)

    run_on(loop_factory, main())
    [finding] = orphans()
    assert finding.location == f"{__file__}:{lines[0]}"
    assert cleanups == ["numbers"]


def test_asynccontextmanager_points_at_the_async_with_line(loop_factory: LoopFactory) -> None:
    asyncdiag.install(exporter="none")
    lines: list[int] = []

    @contextlib.asynccontextmanager
    async def resource() -> AsyncIterator[str]:
        try:
            yield "r"
        finally:
            cleanups.append("resource")

    async def main() -> None:
        manager = resource()
        lines.append(here() + 1)
        assert await manager.__aenter__() == "r"
        del manager  # entered, never exited: its generator is orphaned

    run_on(loop_factory, main())
    [finding] = orphans()
    assert finding.subject.endswith("resource")
    # contextlib's own frame (which calls anext) is skipped: the program's line is shown.
    assert finding.location == f"{__file__}:{lines[0]}"


def test_repeats_fold_into_one_finding(loop_factory: LoopFactory) -> None:
    asyncdiag.install(exporter="none")

    async def main() -> None:
        for _ in range(5):
            async for _value in numbers():
                break

    run_on(loop_factory, main())
    [finding] = orphans()
    assert finding.count == 5
    assert cleanups == ["numbers"] * 5


def test_still_open_at_loop_shutdown_is_reported_and_still_closed(
    loop_factory: LoopFactory,
) -> None:
    asyncdiag.install(exporter="none")
    kept: list[Any] = []
    lines: list[int] = []

    async def main() -> None:
        agen = numbers()
        lines.append(here() + 1)
        await agen.__anext__()
        kept.append(agen)  # alive until the loop shuts down

    run_on(loop_factory, main())  # runs loop.shutdown_asyncgens()
    # shutdown_asyncgens still closed it (the loop's hooks were chained, not replaced).
    assert cleanups == ["numbers"]
    assert kept[0].ag_frame is None
    [finding] = orphans()
    assert "shut down" in finding.message and "shutdown_asyncgens" in finding.message
    assert finding.location == f"{__file__}:{lines[0]}"
    kept.clear()
    assert len(orphans()) == 1  # closed by shutdown: not reported a second time


def test_asyncio_run_reports_generators_left_open(loop_factory: LoopFactory) -> None:
    if sys.version_info < (3, 11):
        pytest.skip("asyncio.Runner(loop_factory=...) needs 3.11")
    asyncdiag.install(exporter="none")
    kept: list[Any] = []

    async def main() -> None:
        agen = numbers()
        await agen.__anext__()
        kept.append(agen)

    with asyncio.Runner(loop_factory=loop_factory) as runner:  # type: ignore[attr-defined]
        runner.run(main())
    assert cleanups == ["numbers"]
    assert [f.location is not None for f in orphans()] == [True]


# -- negative cases -------------------------------------------------------------------------


def test_no_finding_for_closed_exhausted_or_never_started(loop_factory: LoopFactory) -> None:
    asyncdiag.install(exporter="none")

    async def main() -> None:
        async for _ in numbers():  # exhausted
            pass
        agen = numbers()
        await agen.__anext__()
        await agen.aclose()  # closed explicitly
        del agen
        async with contextlib.aclosing(numbers()) as closing:  # closed by aclosing
            async for _ in closing:
                break
        never = numbers()  # created, never iterated
        del never
        unstarted = numbers()
        await unstarted.aclose()  # closed before it started
        del unstarted
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            made = numbers()
            made.__anext__()  # an awaitable made and dropped: the body never ran
            del made
            gc.collect()

        async def raises() -> AsyncIterator[int]:
            yield 1
            raise ValueError("boom")

        with contextlib.suppress(ValueError):
            async for _ in raises():  # finished by an exception
                pass
        gc.collect()

    run_on(loop_factory, main())
    assert orphans() == []
    assert cleanups.count("numbers") == 3  # the started ones; the others never entered try


def test_generator_closed_by_the_program_before_shutdown_is_not_reported(
    loop_factory: LoopFactory,
) -> None:
    asyncdiag.install(exporter="none")
    kept: list[Any] = []

    async def main() -> None:
        agen = numbers()
        await agen.__anext__()
        kept.append(agen)
        await agen.aclose()

    run_on(loop_factory, main())
    assert orphans() == []
    kept.clear()
    assert orphans() == []


def test_nothing_reported_after_uninstall(loop_factory: LoopFactory) -> None:
    asyncdiag.install(exporter="none")
    kept: list[Any] = []

    async def main() -> None:
        agen = numbers()
        await agen.__anext__()
        kept.append(agen)

    loop = loop_factory()
    try:
        loop.run_until_complete(main())
        asyncdiag.uninstall()
        kept.clear()  # orphaned after uninstall: the generator still holds our finalizer
        gc.collect()
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    assert orphans() == []
    assert cleanups == ["numbers"]  # ...which passed the call on to the loop's


def test_disabled_by_configuration(loop_factory: LoopFactory) -> None:
    asyncdiag.install(exporter="none", track_asyncgens=False)
    assert _lifecycle.current() is not None
    assert _lifecycle.current().component("asyncgen tracker") is None  # type: ignore[union-attr]

    async def main() -> None:
        async for _ in numbers():
            break

    run_on(loop_factory, main())
    assert orphans() == []


# -- chaining with hooks set by others ---------------------------------------------------------


class UserHooks:
    """Hooks an application or library installs itself (trio-style)."""

    def __init__(self) -> None:
        self.first: list[str] = []
        self.final: list[str] = []

    def firstiter(self, agen: Any) -> None:
        self.first.append(agen.__qualname__)

    def finalizer(self, agen: Any) -> None:
        self.final.append(agen.__qualname__)
        # What CPython does when there is no finalizer: close it synchronously.
        with contextlib.suppress(StopIteration, RuntimeError):
            agen.aclose().send(None)


def drive(awaitable: Any) -> Any:
    """Run an awaitable that never really suspends, without any event loop."""
    try:
        awaitable.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("suspended")


async def plain(n: int = 2) -> AsyncIterator[int]:
    try:
        for i in range(n):
            yield i
    finally:
        cleanups.append("plain")


@pytest.mark.parametrize("when", ["before install", "after install"])
def test_user_hooks_are_called_and_restored(when: str, loop_factory: LoopFactory) -> None:
    saved = sys.get_asyncgen_hooks()
    hooks = UserHooks()
    try:
        if when == "before install":
            sys.set_asyncgen_hooks(hooks.firstiter, hooks.finalizer)
            asyncdiag.install(exporter="none")
        else:
            asyncdiag.install(exporter="none")
            sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=hooks.finalizer)
        # Whoever asks sees what was set, not asyncdiag's chain.
        assert tuple(sys.get_asyncgen_hooks()) == (hooks.firstiter, hooks.finalizer)

        # Outside any loop the user's hooks are the thread's hooks: called, and tracked.
        agen = plain()
        line = here() + 1
        assert drive(agen.__anext__()) == 0
        del agen
        assert hooks.first == ["plain"] and hooks.final == ["plain"]
        assert cleanups == ["plain"]
        [finding] = orphans()
        assert finding.location == f"{__file__}:{line}" and finding.task is None

        # A loop swaps its own hooks in for its run and gives the user's back afterwards.
        async def main() -> None:
            assert sys.get_asyncgen_hooks().firstiter != hooks.firstiter
            async for _ in numbers():
                break

        run_on(loop_factory, main())
        assert tuple(sys.get_asyncgen_hooks()) == (hooks.firstiter, hooks.finalizer)
        assert hooks.first == ["plain"]  # the loop's hooks, not the user's, ran inside it
        assert cleanups == ["plain", "numbers"]
        assert len(orphans()) == 2

        asyncdiag.uninstall()
        # Still in place, as the raw interpreter state, after uninstall.
        assert tuple(sys.get_asyncgen_hooks()) == (hooks.firstiter, hooks.finalizer)
        agen = plain()
        drive(agen.__anext__())
        del agen
        assert hooks.final == ["plain", "plain"]
    finally:
        asyncdiag.uninstall()
        sys.set_asyncgen_hooks(*saved)


def test_hooks_wrapping_the_loops_hooks_inside_a_run(loop_factory: LoopFactory) -> None:
    """A library that chains to the running loop's hooks itself (saves get(), sets its own,
    calls the saved ones, restores them) keeps working, and so does the loop."""
    asyncdiag.install(exporter="none")
    calls: list[str] = []

    async def main() -> None:
        loop_hooks = sys.get_asyncgen_hooks()
        assert getattr(loop_hooks.firstiter, "__self__", None) is asyncio.get_running_loop()

        def firstiter(agen: Any) -> None:
            calls.append("first")
            loop_hooks.firstiter(agen)

        def finalizer(agen: Any) -> None:
            calls.append("final")
            loop_hooks.finalizer(agen)

        sys.set_asyncgen_hooks(firstiter, finalizer)
        try:
            async for _ in numbers():
                break
            await asyncio.sleep(0)  # the loop's finalizer scheduled aclose(): let it run
            await asyncio.sleep(0)
        finally:
            sys.set_asyncgen_hooks(*loop_hooks)
        assert tuple(sys.get_asyncgen_hooks()) == tuple(loop_hooks)

    run_on(loop_factory, main())
    assert calls == ["first", "final"]
    assert cleanups == ["numbers"]
    assert len(orphans()) == 1


def test_set_validates_arguments_like_the_original() -> None:
    asyncdiag.install(exporter="none")
    before = sys.get_asyncgen_hooks()
    with pytest.raises(TypeError) as ours:
        sys.set_asyncgen_hooks(firstiter=42)  # type: ignore[arg-type]
    asyncdiag.uninstall()
    with pytest.raises(TypeError) as theirs:
        sys.set_asyncgen_hooks(firstiter=42)  # type: ignore[arg-type]
    assert str(ours.value) == str(theirs.value)
    assert sys.get_asyncgen_hooks() == before


def test_partial_set_keeps_the_other_hook() -> None:
    saved = sys.get_asyncgen_hooks()
    hooks = UserHooks()
    try:
        asyncdiag.install(exporter="none")
        sys.set_asyncgen_hooks(hooks.firstiter, hooks.finalizer)
        sys.set_asyncgen_hooks(firstiter=None)
        assert tuple(sys.get_asyncgen_hooks()) == (None, hooks.finalizer)
        sys.set_asyncgen_hooks(finalizer=None)
        assert tuple(sys.get_asyncgen_hooks()) == (None, None)
        sys.set_asyncgen_hooks(finalizer=hooks.finalizer)
        assert tuple(sys.get_asyncgen_hooks()) == (None, hooks.finalizer)
        asyncdiag.uninstall()
        assert tuple(sys.get_asyncgen_hooks()) == (None, hooks.finalizer)
    finally:
        sys.set_asyncgen_hooks(*saved)


def test_install_inside_a_running_loop_chains_its_hooks(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        asyncdiag.install(exporter="none")
        async for _ in numbers():
            break
        await asyncio.sleep(0)
        asyncdiag.uninstall()  # while the loop still runs: its own hooks come back
        hooks = sys.get_asyncgen_hooks()
        assert getattr(hooks.firstiter, "__self__", None) is asyncio.get_running_loop()

    run_on(loop_factory, main())
    assert len(orphans()) == 1
    assert cleanups == ["numbers"]


def test_loop_that_set_its_hooks_through_a_cached_reference_is_rechained() -> None:
    """uvloop or another loop could cache ``sys.set_asyncgen_hooks`` at import; the
    loop-run subscription re-chains such hooks when the run starts."""
    cached_set = sys.set_asyncgen_hooks
    loop = asyncio.SelectorEventLoop()  # constructed directly: not announced at creation
    asyncdiag.install(exporter="none")

    async def main() -> None:
        running = asyncio.get_running_loop()
        # Simulate the bypass: the loop's hooks set raw, asyncdiag's chain gone.
        cached_set(running._asyncgen_firstiter_hook,  # type: ignore[attr-defined]
                   running._asyncgen_finalizer_hook)  # type: ignore[attr-defined]
        for _ in range(3):  # the run announcement is queued behind this first step
            await asyncio.sleep(0)
        async for _ in numbers():
            break

    try:
        loop.run_until_complete(main())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    assert len(orphans()) == 1


def test_generators_in_another_threads_loop_are_tracked(loop_factory: LoopFactory) -> None:
    asyncdiag.install(exporter="none")
    errors: list[BaseException] = []

    async def main() -> None:
        async for _ in numbers():
            break

    def thread_main() -> None:
        try:
            run_on(loop_factory, main())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=thread_main)
    thread.start()
    thread.join(30)
    assert not errors
    assert len(orphans()) == 1
    assert cleanups == ["numbers"]


# -- robustness ------------------------------------------------------------------------------


class ExplodingRegistry(dict):  # type: ignore[type-arg]
    def __setitem__(self, key: object, value: object) -> None:
        raise RuntimeError("internal failure")


def test_internal_failure_is_logged_once_and_never_reaches_the_program(
    loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    asyncdiag.install(exporter="none")
    tracker().registry = ExplodingRegistry()
    kept: list[Any] = []

    async def main() -> list[int]:
        values = [v async for v in numbers()]
        async for _ in numbers():
            break
        agen = numbers()
        await agen.__anext__()
        kept.append(agen)
        return values

    with caplog.at_level(logging.ERROR, logger="asyncdiag"):
        assert run_on(loop_factory, main()) == [0, 1, 2]
    errors = [r for r in caplog.records if "asyncgen tracker" in r.getMessage()]
    assert len(errors) == 1
    # The loop's hooks kept working: the orphan and the one left open were both closed.
    assert cleanups == ["numbers"] * 3
    assert orphans() == []


async def _first_step(agen: AsyncIterator[int]) -> None:
    await agen.__anext__()


def test_c_and_python_hooks_record_the_same_entry(
    loop_factory: LoopFactory, hook_implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both implementations, on the same iterations, make identical registry entries: from
    the program's frame, and past contextlib's (the slow path through ``locate``)."""
    if hook_implementation != "C":
        pytest.skip("compares the C hook with the Python one: runs once")
    asyncdiag.install(exporter="none")

    @contextlib.asynccontextmanager
    async def managed() -> AsyncIterator[int]:
        yield 1

    def entries() -> list[Any]:
        recorded: list[Any] = []

        async def main() -> None:
            recorded.append(type(installed_firstiter()).__name__)
            plain = numbers()
            await _first_step(plain)
            manager = managed()
            async with manager:
                pass
            registry = tracker().registry
            for agen in (plain, manager.gen):  # type: ignore[attr-defined]
                ref, chain, code, lasti, task = registry[id(agen)]
                recorded.append((ref, type(chain).__name__, code, lasti, task))
            await plain.aclose()

        async def named() -> None:
            await asyncio.create_task(main(), name="worker-3")

        run_on(loop_factory, named())
        return recorded

    with_c = entries()
    monkeypatch.setattr(_asyncgens, "_CFirstIterHook", None)
    with_python = entries()
    assert (with_c.pop(0), with_python.pop(0)) == ("FirstIterHook", "function")
    assert with_c == with_python
    assert [e[2].co_name for e in with_c] == ["_first_step", "main"]
    assert [e[4] for e in with_c] == ["worker-3", "worker-3"]
    assert with_c[0][0] is None  # under the loop's own hooks: no weak reference
    assert orphans() == []


def _stale_entry(chain: Any) -> tuple[Any, ...]:
    # What a dead generator first iterated elsewhere leaves under its id (a fresh tuple, so
    # that only the registry will hold it).
    return (None, chain, _stale_entry.__code__, int("4242"), "".join(["old", "-task"]))


@pytest.mark.parametrize("held_elsewhere", [False, True], ids=["only-registry", "held"])
def test_entry_left_by_a_dead_generator_is_replaced_by_the_new_ones(
    loop_factory: LoopFactory, hook_implementation: str, held_elsewhere: bool
) -> None:
    """A new generator whose id is the key of a stale entry gets its own call site and task.
    The C hook rewrites such an entry in place when only the registry holds it, and stores a
    new one when anything else holds it (a prune classifying entries holds them all): the
    entry a holder has must not change under it."""
    asyncdiag.install(exporter="none")
    lines: list[int] = []

    async def main() -> tuple[tuple[Any, ...], bool, tuple[Any, ...] | None]:
        registry = tracker().registry
        chain = installed_firstiter()._asyncdiag_chain
        agen = numbers()
        registry[id(agen)] = _stale_entry(chain)
        held = registry[id(agen)] if held_elsewhere else None
        stale_id = id(registry[id(agen)])
        lines.append(here() + 1)
        await agen.__anext__()
        entry = registry[id(agen)]
        same_object = id(entry) == stale_id
        await agen.aclose()
        return entry, same_object, held

    async def named() -> tuple[tuple[Any, ...], bool, tuple[Any, ...] | None]:
        return await asyncio.create_task(main(), name="fresh-task")

    entry, same_object, held = run_on(loop_factory, named())
    _, _, code, lasti, task = entry
    assert _asyncgens.code_location(code, lasti) == f"{__file__}:{lines[0]}"
    assert task == "fresh-task"
    if held_elsewhere:
        assert held is not None and not same_object
        assert held[2:] == (_stale_entry.__code__, 4242, "old-task")  # untouched
    else:
        assert same_object == (hook_implementation == "C")
    assert orphans() == []


def test_first_iteration_hook_keeps_no_reference(loop_factory: LoopFactory) -> None:
    """Every object the hook touches per generator has the same reference count after 1,000
    generators as before, once the registry's entries are dropped: a reference the C hook took
    and never released would show here (a leaked new object shows in the memory test)."""
    asyncdiag.install(exporter="none")

    async def one() -> AsyncIterator[int]:
        yield 1

    async def step() -> None:
        agen = one()
        await agen.__anext__()
        await agen.aclose()

    async def main() -> tuple[list[int], list[int]]:
        task = asyncio.current_task()
        assert task is not None
        hook = installed_firstiter()
        chain = hook._asyncdiag_chain
        # Not the loop: its own callbacks take and drop references to it meanwhile.
        watched = [task, task.get_name(), step.__code__, hook, chain, chain.first, tracker(),
                   one.__code__]
        for _ in range(100):
            await step()
        registry = tracker().registry
        registry.clear()
        before = [sys.getrefcount(o) for o in watched]
        for _ in range(1000):
            await step()
        assert len(registry) > 0
        registry.clear()
        after = [sys.getrefcount(o) for o in watched]
        return before, after

    before, after = run_on(loop_factory, main())
    assert after == before


# -- telemetry and memory ----------------------------------------------------------------------


def test_active_counter_is_current_at_each_collection(loop_factory: LoopFactory) -> None:
    """No timer on the loop: the count is brought up to date when a reader collects."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from asyncdiag import _telemetry

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    _telemetry.use_providers(meter_provider=provider)

    def active() -> int | None:
        data = reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == _names.ASYNCGEN_ACTIVE.name:
                        return sum(int(p.value) for p in metric.data.data_points)
        return None

    seen: dict[str, int | None] = {}
    try:
        asyncdiag.install(exporter="none")

        async def main() -> None:
            loop = asyncio.get_running_loop()
            scheduled = len(getattr(loop, "_scheduled", ()))
            open_ones = [numbers() for _ in range(5)]
            for agen in open_ones:
                await agen.__anext__()
            seen["open"] = active()
            for agen in open_ones[:3]:
                await agen.aclose()  # closed, still referenced: no longer active
            async for _ in numbers():
                pass
            seen["two left"] = active()
            del open_ones  # the last two are orphaned: collected
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            seen["none left"] = active()
            # asyncdiag added no timer to the loop.
            assert len(getattr(loop, "_scheduled", ())) == scheduled

        run_on(loop_factory, main())
        asyncdiag.uninstall()
        seen["uninstalled"] = active()
    finally:
        asyncdiag.uninstall()
        provider.shutdown()
    assert seen["open"] == 5 and seen["two left"] == 2 and seen["none left"] == 0
    assert seen["uninstalled"] in (0, None)  # back to zero, or no longer observed at all


MEMORY_GENERATORS = 40_000
WARM_UP = 8_000


def test_memory_stays_flat_over_many_generators(loop_factory: LoopFactory) -> None:
    """Created and dropped, orphaned or not: the registry holds no generator and is pruned.
    ``python benchmarks/bench_asyncgens.py memory`` runs the same churn with 1,000,000 and RSS."""
    import tracemalloc
    from types import AsyncGeneratorType

    asyncdiag.install(exporter="none")

    async def one() -> AsyncIterator[int]:
        yield 1
        yield 2

    async def churn(n: int) -> None:
        for i in range(n):
            agen = one()
            await agen.__anext__()
            if i % 4 == 0:
                del agen  # orphaned: the loop's finalizer closes it later
            elif i % 4 == 1:
                await agen.aclose()
            else:
                async for _ in agen:
                    pass
            if i % 256 == 0:
                await asyncio.sleep(0)  # let the loop run the scheduled aclose() tasks

    async def main() -> tuple[int, int, int]:
        await churn(WARM_UP)  # warm up: caches, the folded finding, interned strings
        await asyncio.sleep(0)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            await churn(MEMORY_GENERATORS)
            await asyncio.sleep(0)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        ours = [tracemalloc.Filter(True, "*asyncdiag/_asyncgens.py")]
        growth_ours = sum(
            d.size_diff for d in after.filter_traces(ours).compare_to(
                before.filter_traces(ours), "filename"))
        growth_all = sum(d.size_diff for d in after.compare_to(before, "filename"))
        return growth_ours, growth_all, len(tracker().registry)

    growth_ours, growth_all, registered = run_on(loop_factory, main())
    [finding] = orphans()
    assert finding.count == (WARM_UP + MEMORY_GENERATORS) // 4
    alive = sum(1 for o in gc.get_objects() if isinstance(o, AsyncGeneratorType))
    assert alive < 10
    assert registered <= 2 * 1024
    # Allocated by the tracker and still held: the registry's dict at its bounded size.
    assert growth_ours < 64 * 1024, f"asyncdiag/_asyncgens.py grew by {growth_ours} bytes"
    # Whole process, every component: one leaked object per generator would be megabytes.
    assert growth_all < 1024 * 1024, f"grew by {growth_all} bytes"


def test_our_own_hooks_set_again_are_not_chained_twice(loop_factory: LoopFactory) -> None:
    """Code that read the hooks raw (a get cached before install) and sets them back must not
    end up with asyncdiag's chain wrapped in another: one report per orphan."""
    cached_get = sys.get_asyncgen_hooks
    asyncdiag.install(exporter="none")

    async def main() -> None:
        raw = cached_get()  # asyncdiag's chain around the loop's hooks
        sys.set_asyncgen_hooks(*raw)
        loop: Any = asyncio.get_running_loop()
        # What the loop set is what is seen: not asyncdiag's chain inside another one.
        assert tuple(sys.get_asyncgen_hooks()) == (
            loop._asyncgen_firstiter_hook, loop._asyncgen_finalizer_hook)
        async for _ in numbers():
            break
        await asyncio.sleep(0)

    run_on(loop_factory, main())
    [finding] = orphans()
    assert finding.count == 1
    assert cleanups == ["numbers"]


def test_a_raising_hook_of_theirs_raises_as_without_asyncdiag() -> None:
    saved = sys.get_asyncgen_hooks()

    class Refused(Exception):
        pass

    def firstiter(agen: Any) -> None:
        raise Refused(agen.__qualname__)

    def outcome() -> tuple[type[BaseException], str, list[str]]:
        sys.set_asyncgen_hooks(firstiter, lambda agen: None)
        try:
            agen = plain()
            with pytest.raises(Refused) as info:
                drive(agen.__anext__())
            return info.type, str(info.value), cleanups[:]
        finally:
            sys.set_asyncgen_hooks(*saved)

    without = outcome()
    asyncdiag.install(exporter="none")
    with_agent = outcome()
    asyncdiag.uninstall()
    assert with_agent == without == (Refused, "plain", [])
    assert orphans() == []


def test_instrumented_generator_is_reported_once_at_the_users_lines(
    loop_factory: LoopFactory,
) -> None:
    """With ``@asyncdiag.instrument`` the program iterates asyncdiag's proxy generator, which
    drives the user's: the finding still names the user's function, definition and line."""
    definition = here() + 2

    @asyncdiag.instrument
    async def pages() -> AsyncIterator[int]:
        try:
            for page in range(5):
                await asyncio.sleep(0)
                yield page
        finally:
            cleanups.append("pages")

    asyncdiag.install(exporter="none")
    lines: list[int] = []

    async def main() -> None:
        lines.append(here() + 1)
        async for page in pages():
            if page == 1:
                break
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    run_on(loop_factory, main())
    [finding] = orphans()
    assert finding.subject.endswith("pages")
    assert finding.location == f"{__file__}:{lines[0]}"
    assert f"defined at {__file__}:{definition}" in finding.message
    assert cleanups == ["pages"]


def test_identical_modules_in_two_directories_get_their_own_locations(
    tmp_path: Any, loop_factory: LoopFactory
) -> None:
    """Code objects compare equal across files (equality ignores co_filename): a cache keyed
    by code alone named the first directory's file for the second's orphan."""
    import importlib.util

    source = (
        "async def numbers():\n"
        "    yield 1\n"
        "    yield 2\n"
        "\n"
        "async def leave_open():\n"
        "    async for _ in numbers():\n"
        "        break\n"
    )
    asyncdiag.install(exporter="none")
    paths = []
    for name in ("one", "two"):
        directory = tmp_path / name
        directory.mkdir()
        path = directory / "same_module.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"same_module_{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        run_on(loop_factory, module.leave_open())
        gc.collect()
        paths.append(str(path))
    locations = {f.location for f in asyncdiag.findings() if f.kind == "orphaned_asyncgen"}
    assert locations == {f"{paths[0]}:6", f"{paths[1]}:6"}


# -- the loop's own generator set --------------------------------------------------------------


def test_entries_under_the_loops_own_hooks_hold_no_weak_reference(
    loop_factory: LoopFactory,
) -> None:
    """asyncio's and uvloop's hooks keep every generator in the loop's weak set: asyncdiag's
    entries lean on it instead of holding a weak reference each (the cost per generator), and
    are still pruned once the generator is finished or gone."""
    asyncdiag.install(exporter="none")
    kept: list[Any] = []
    seen: dict[str, Any] = {}

    async def main() -> None:
        loop: Any = asyncio.get_running_loop()
        chain = installed_firstiter()._asyncdiag_chain
        seen["set found"] = chain.agens is not None
        if hasattr(loop, "_asyncgens"):  # asyncio's is a Python attribute, uvloop's is not
            seen["the loop's set"] = chain.agens is loop._asyncgens
        suspended = numbers()
        await suspended.__anext__()
        finished = numbers()
        assert [v async for v in finished] == [0, 1, 2]
        dropped = numbers()
        await dropped.__anext__()
        dropped_key = id(dropped)
        await dropped.aclose()
        del dropped
        registry = tracker().registry
        seen["references"] = [registry[id(a)][0] for a in (suspended, finished)]
        tracker().prune()
        seen["kept"] = [key in registry for key in (id(suspended), id(finished), dropped_key)]
        kept.append(suspended)

    run_on(loop_factory, main())
    assert seen["set found"] and seen.get("the loop's set", True)
    assert seen["references"] == [None, None]
    assert seen["kept"] == [True, False, False]
    # Left open, closed by shutdown_asyncgens(), reported as such.
    [finding] = orphans()
    assert "shut down" in finding.message


def test_loop_with_its_own_firstiter_hook_is_tracked_through_weak_references(
    loop_factory: LoopFactory,
) -> None:
    """A loop class that overrides ``_asyncgen_firstiter_hook`` may keep no weak set: its
    generators get a weak reference each, and every behaviour stays the same."""
    probe = loop_factory()
    base: Any = type(probe)
    probe.close()
    called: list[str] = []

    class OwnHookLoop(base):  # type: ignore[misc, valid-type]
        def _asyncgen_firstiter_hook(self, agen: Any) -> None:
            called.append(agen.__qualname__)
            super()._asyncgen_firstiter_hook(agen)

    asyncdiag.install(exporter="none")
    kept: list[Any] = []
    lines: list[int] = []
    seen: dict[str, Any] = {}

    async def main() -> None:
        chain = installed_firstiter()._asyncdiag_chain
        seen["set found"] = chain.agens is not None
        lines.append(here() + 1)
        async for value in numbers():
            if value == 1:
                break
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        left_open = numbers()
        await left_open.__anext__()
        seen["reference"] = tracker().registry[id(left_open)][0] is not None
        kept.append(left_open)

    run_on(OwnHookLoop, main())
    assert called == ["numbers", "numbers"]
    assert seen == {"set found": False, "reference": True}
    collected, at_shutdown = sorted(orphans(), key=lambda f: "shut down" in f.message)
    assert collected.location == f"{__file__}:{lines[0]}"
    assert "shut down" in at_shutdown.message
    assert cleanups == ["numbers", "numbers"]
