"""Instrumentation of async context managers, iterators and generators (issue 5).

Every test drives real event loops (asyncio and uvloop) and real modules written to a
temporary directory and imported by name, so that import-time patching is what is tested.
Telemetry is read from real SDK providers handed to the agent (in-memory span exporter and
metric reader); findings from ``asyncdiag.findings()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import inspect
import logging
import sys
import textwrap
import time
import traceback
import types
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import asyncdiag
from _support import assert_c_hot_paths, run_on, use_python_hot_paths
from asyncdiag import _names, _proxies, _telemetry

PY311 = sys.version_info >= (3, 11)


# -- fixtures ----------

class Modules:
    """Writes modules under a temporary directory on sys.path; forgets them afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names: list[str] = []

    def write(self, source: str, name: str | None = None) -> str:
        name = name or f"adx_{uuid.uuid4().hex[:10]}"
        path = self.root.joinpath(*name.split("."))
        if "." in name:
            for i in range(1, len(name.split("."))):
                package = self.root.joinpath(*name.split(".")[:i])
                package.mkdir(exist_ok=True)
                init = package / "__init__.py"
                if not init.exists():
                    init.write_text("")
        path.with_suffix(".py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        self.names.append(name)
        return name

    def cleanup(self) -> None:
        for name in list(sys.modules):
            if any(name == n or name.startswith(n.split(".")[0] + ".") or
                   name == n.split(".")[0] for n in self.names):
                del sys.modules[name]


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Modules]:
    sys.path.insert(0, str(tmp_path))
    mods = Modules(tmp_path)
    try:
        yield mods
    finally:
        mods.cleanup()
        sys.path.remove(str(tmp_path))


class Otel:
    def __init__(self, sampled: bool = True) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(sampler=None if sampled else ALWAYS_OFF)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def install(self, *targets: str, **kwargs: Any) -> asyncdiag.Agent:
        _telemetry.use_providers(self.tracer_provider, self.meter_provider)
        return asyncdiag.install(instrument=targets, exporter="none", **kwargs)

    def finished(self, prefix: str = "") -> list[Any]:
        return [s for s in self.spans.get_finished_spans() if s.name.startswith(prefix)]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == metric:
                        found.extend(m.data.data_points)
        return found

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@contextlib.contextmanager
def otel_for(sampled: bool = True) -> Iterator[Otel]:
    """In-memory providers for a test; afterwards the agent is uninstalled and they shut down."""
    o = Otel(sampled)
    try:
        yield o
    finally:
        asyncdiag.uninstall()
        o.shutdown()


@pytest.fixture(autouse=True, params=["c-hot-paths", "python-hot-paths"])
def hot_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: with the C extension's hot paths (``MeasuredDunder`` as the patched
    ``__aenter__``/``__aexit__``, traced blocks opened and closed by ``BlockOps``, generator
    requests counted by ``CountedBase``) and with their Python references."""
    if request.param == "python-hot-paths":
        use_python_hot_paths(monkeypatch)
    else:
        pytest.importorskip("asyncdiag._speedups")
        assert_c_hot_paths()
    return str(request.param)


@pytest.fixture(params=["c", "python"])
def record_since(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The wrappers' step that records a duration: the C extension's, and the Python one
    used where it was not built (the same contract, ``_telemetry.record_since``)."""
    if request.param == "python":
        monkeypatch.setattr(_proxies, "_record_since", _telemetry._record_since_python)
    else:
        speedups = pytest.importorskip("asyncdiag._speedups")
        assert _proxies._record_since is speedups.record_since
    return str(request.param)


@pytest.fixture
def otel() -> Iterator[Otel]:
    with otel_for() as o:
        yield o


def kinds() -> list[str]:
    return [f.kind for f in asyncdiag.findings()]


# -- the seed guide's examples, as a real module ---------------------------------------------------

SEED = '''
import asyncio
import contextlib
import gc
import sys
from contextlib import asynccontextmanager


class AsyncConnectionManager:
    """Opens a TCP connection on enter, closes it on exit."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def __aenter__(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, exc_type, exc, tb):
        self.writer.close()
        await self.writer.wait_closed()
        return False


async def paginated_stream(fetch_page, last_page):
    """Yields the items of page after page, fetching lazily."""
    page = 0
    while page <= last_page:
        items = await fetch_page(page)
        for item in items:
            yield item
        page += 1


class WebSocketIterator:
    """Messages from a connection until the peer closes it."""

    def __init__(self, reader):
        self.reader = reader

    def __aiter__(self):
        return self

    async def __anext__(self):
        line = await self.reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode().rstrip("\\n")


@asynccontextmanager
async def db_pool_manager(size):
    """A pool of connections handed out by a queue; all closed on the way out."""
    pool = asyncio.Queue()
    opened = [f"conn-{i}" for i in range(size)]
    for conn in opened:
        pool.put_nowait(conn)
    try:
        yield pool
    finally:
        while not pool.empty():
            pool.get_nowait()
        opened.clear()


class Resource:
    def __init__(self, name, log):
        self.name, self.log = name, log

    async def __aenter__(self):
        await asyncio.sleep(0)
        self.log.append(("enter", self.name))
        return self

    async def __aexit__(self, exc_type, exc, tb):
        await asyncio.sleep(0)
        self.log.append(("exit", self.name, exc_type))
        return False


async def parallel_resource_teardown(resources):
    """Tears resources down concurrently: __aexit__ awaited in other tasks."""
    if sys.version_info >= (3, 11):
        async with asyncio.TaskGroup() as tg:
            for res in resources:
                tg.create_task(res.__aexit__(None, None, None))
    else:
        await asyncio.gather(*(res.__aexit__(None, None, None) for res in resources))


async def process_stream(stream, stop_at=None):
    """Consumes a stream, transforming items, stopping early on a sentinel."""
    results = []
    async for item in stream:
        if item == stop_at:
            break
        await asyncio.sleep(0)
        results.append(item * 2)
    return results
'''


async def _line_server(lines: int) -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(lines):
            writer.write(f"message {i}\n".encode())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def seed_scenario(seed: types.ModuleType) -> dict[str, Any]:
    """Every seed example once; returns what the program observed."""
    facts: dict[str, Any] = {}
    server, port = await _line_server(5)
    async with server:
        async with seed.AsyncConnectionManager("127.0.0.1", port) as conn:
            facts["messages"] = [m async for m in seed.WebSocketIterator(conn.reader)]

        async def fetch(page: int) -> list[int]:
            await asyncio.sleep(0)
            return [page * 10 + i for i in range(3)]

        facts["all"] = await seed.process_stream(seed.paginated_stream(fetch, 3))
        stream = seed.paginated_stream(fetch, 3)
        facts["early"] = await seed.process_stream(stream, stop_at=11)
        await stream.aclose()
        async with seed.db_pool_manager(3) as pool:
            facts["pool"] = pool.qsize()
            conn_name = await pool.get()
            facts["conn"] = conn_name
        try:
            async with seed.db_pool_manager(2):
                raise KeyError("inside")
        except KeyError as exc:
            facts["pool_error"] = exc.args
        log: list[Any] = []
        resources = [seed.Resource(f"r{i}", log) for i in range(3)]
        for res in resources:
            await res.__aenter__()
        await seed.parallel_resource_teardown(resources)
        facts["teardown"] = sorted(map(repr, log))
    return facts


def test_seed_examples_behave_identically_and_are_measured(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain = importlib.import_module(modules.write(SEED))
    expected = run_on(loop_factory, seed_scenario(plain))

    name = modules.write(SEED)
    otel.install(f"{name}.*")
    seed = importlib.import_module(name)  # imported after install: patched by the import hook
    caplog.set_level(logging.DEBUG)
    got = run_on(loop_factory, seed_scenario(seed))

    assert got == expected
    assert expected["messages"] == [f"message {i}" for i in range(5)]
    assert expected["early"] == [0, 2, 4, 20]
    spans = {s.name for s in otel.finished()}
    assert {
        "async with AsyncConnectionManager", "async for WebSocketIterator",
        "async for paginated_stream", "async with db_pool_manager", "async with Resource",
    } <= spans
    by_name: dict[str, list[Any]] = {}
    for s in otel.finished():
        by_name.setdefault(s.name, []).append(s)
    stream_spans = by_name["async for paginated_stream"]
    outcomes = sorted(s.attributes[_names.ATTR_OUTCOME] for s in stream_spans)
    assert outcomes == ["closed", "ok"]
    assert sorted(s.attributes["asyncdiag.items"] for s in stream_spans) == [5, 12]
    ws = by_name["async for WebSocketIterator"][0]
    assert ws.attributes["asyncdiag.items"] == 5
    pool_outcomes = sorted(s.attributes[_names.ATTR_OUTCOME] for s in by_name[
        "async with db_pool_manager"])
    assert pool_outcomes == ["error", "ok"]
    # __aexit__ awaited in other tasks: spans end, and no context error anywhere.
    assert len(by_name["async with Resource"]) == 3
    assert not [r for r in caplog.records if "detach" in r.getMessage().lower()]
    subjects = {p.attributes[_names.ATTR_SUBJECT] for p in otel.points(
        _names.CONTEXT_ENTER_DURATION.name)}
    assert f"{name}.AsyncConnectionManager" in subjects
    assert f"{name}.db_pool_manager" in subjects
    yields = {p.attributes[_names.ATTR_SUBJECT]: p.value for p in otel.points(
        _names.ITERATOR_YIELDS.name)}
    assert yields[f"{name}.paginated_stream"] == 17
    assert yields[f"{name}.WebSocketIterator"] == 5
    assert kinds() == []


# -- findings ----------

MISTAKES = '''
import asyncio
import contextlib
import gc

class Forgiving:
    async def __aenter__(self):
        return self
    async def __aexit__(self, exc_type, exc, tb):
        return True

class Stubborn:
    async def __aenter__(self):
        return self
    async def __aexit__(self, exc_type, exc, tb):
        return exc_type is asyncio.CancelledError

class CatchesDuringClose:
    async def __aenter__(self):
        return self
    async def __aexit__(self, exc_type, exc, tb):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass

class SlowClose:
    async def __aenter__(self):
        return self
    async def __aexit__(self, exc_type, exc, tb):
        await asyncio.sleep(0.06)

async def slow_to_close():
    try:
        yield 1
        yield 2
    finally:
        await asyncio.sleep(0.06)

async def deaf_stream():
    for i in range(3):
        try:
            await asyncio.sleep(0.5 if i == 0 else 0)
        except asyncio.CancelledError:
            pass
        yield i
'''


def test_swallowed_exception_names_subject_and_async_with_line(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(MISTAKES)
    otel.install(f"{name}:Forgiving")
    mod = importlib.import_module(name)

    async def main() -> str:
        async with mod.Forgiving():
            raise ValueError("lost")
        return "went on"

    line = inspect.getsourcelines(main)[1] + 1
    assert run_on(loop_factory, main()) == "went on"
    [finding] = asyncdiag.findings()
    assert finding.kind == _names.SWALLOWED_EXCEPTION
    assert finding.subject == f"{name}.Forgiving"
    assert finding.location == f"{__file__}:{line}"
    assert "ValueError" in finding.message
    [span] = otel.finished("async with")
    assert span.attributes[_names.ATTR_OUTCOME] == "suppressed"
    assert [e.name for e in span.events] == [_names.FINDING_EVENT]


def test_swallowed_cancellation_in_aexit(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(MISTAKES)
    otel.install(f"{name}:Stubborn")
    mod = importlib.import_module(name)

    async def main() -> str:
        async def worker() -> str:
            async with mod.Stubborn():
                await asyncio.sleep(10)
            return "kept running"

        task = asyncio.ensure_future(worker())
        await asyncio.sleep(0.01)
        task.cancel()
        return await task

    assert run_on(loop_factory, main()) == "kept running"
    assert kinds() == [_names.SWALLOWED_CANCELLATION]
    assert asyncdiag.findings()[0].subject == f"{name}.Stubborn"


@pytest.mark.skipif(not PY311, reason="needs Task.cancelling() (3.11+)")
def test_cancellation_caught_inside_aexit_is_found(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
    record_since: str,
) -> None:
    name = modules.write(MISTAKES)
    otel.install(f"{name}:CatchesDuringClose")
    mod = importlib.import_module(name)

    async def main() -> bool:
        async def worker() -> None:
            async with mod.CatchesDuringClose():
                pass

        task = asyncio.ensure_future(worker())
        await asyncio.sleep(0.01)
        task.cancel()
        await task
        return task.cancelled()

    assert run_on(loop_factory, main()) is False
    assert kinds() == [_names.SWALLOWED_CANCELLATION]


@pytest.mark.skipif(not PY311, reason="needs Task.cancelling() (3.11+)")
@pytest.mark.parametrize("sampled", [False, True])
def test_cancellation_caught_inside_aexit_is_found_with_or_without_spans(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, sampled: bool,
    hot_paths: str,
) -> None:
    """Metrics only, the exit goes through the wrappers' common path; traced, through the
    general one. Both find the cancellation kept inside __aexit__, and neither reports an exit
    that was cancelled and let the cancellation out, or one that never suspended."""
    with otel_for(sampled=sampled) as otel:
        name = modules.write(MISTAKES + '''
class ReleasesAtOnce:
    async def __aenter__(self):
        return self
    async def __aexit__(self, exc_type, exc, tb):
        await asyncio.sleep(0) if exc_type is KeyError else None

class LetsItOut:
    async def __aenter__(self):
        return self
    async def __aexit__(self, exc_type, exc, tb):
        await asyncio.sleep(10)
''')
        otel.install(f"{name}:CatchesDuringClose", f"{name}:ReleasesAtOnce",
                     f"{name}:LetsItOut")
        mod = importlib.import_module(name)

        async def main() -> tuple[bool, bool]:
            async with mod.ReleasesAtOnce():
                pass

            async def worker(cls: Any) -> None:
                async with cls():
                    pass

            kept = asyncio.ensure_future(worker(mod.CatchesDuringClose))
            let_out = asyncio.ensure_future(worker(mod.LetsItOut))
            await asyncio.sleep(0.01)
            kept.cancel()
            let_out.cancel()
            await kept
            with pytest.raises(asyncio.CancelledError):
                await let_out
            return kept.cancelled(), let_out.cancelled()

        assert run_on(loop_factory, main()) == (False, True)
        assert [(f.kind, f.subject) for f in asyncdiag.findings()] == [
            (_names.SWALLOWED_CANCELLATION, f"{name}.CatchesDuringClose")]


def test_a_cancellation_requested_by_an_exit_that_never_suspends_is_not_its_to_swallow(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
    hot_paths: str,
) -> None:
    """An __aexit__ that cancels its own task and returns without suspending: the
    CancelledError is delivered at the task's next await, outside __aexit__, so nothing was
    swallowed there. The C path reads the count after the exit only when it suspended; the
    Python fallback reads it every time and reports it (documented)."""
    name = modules.write('''
import asyncio

class CancelsItsTask:
    async def __aenter__(self):
        return self
    async def __aexit__(self, exc_type, exc, tb):
        asyncio.current_task().cancel()
        if exc_type is KeyError:
            await asyncio.sleep(0)  # never taken: the exit can suspend, so the count is read
''')
    otel.install(f"{name}:CancelsItsTask")
    mod = importlib.import_module(name)

    async def main() -> str:
        async with mod.CancelsItsTask():
            pass
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return "cancelled at the next await"
        return "not cancelled"

    assert run_on(loop_factory, main()) == "cancelled at the next await"
    reported = [f for f in asyncdiag.findings() if f.kind == _names.SWALLOWED_CANCELLATION]
    if not PY311:
        assert reported == []  # 3.10 has no Task.cancelling(): nothing is read
    elif hot_paths == "c-hot-paths":
        assert reported == []
    else:
        assert len(reported) == 1


def test_slow_teardown_of_aexit_and_of_aclose(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
    record_since: str,
) -> None:
    name = modules.write(MISTAKES)
    otel.install(f"{name}.*", slow_teardown_threshold=0.03)
    mod = importlib.import_module(name)

    async def main() -> list[int]:
        async with mod.SlowClose():
            pass
        gen = mod.slow_to_close()
        first = [await gen.__anext__()]
        await gen.aclose()
        return first

    assert run_on(loop_factory, main()) == [1]
    found = {f.subject: f for f in asyncdiag.findings()}
    assert set(kinds()) == {_names.SLOW_TEARDOWN}
    assert found[f"{name}.SlowClose"].duration >= 0.05
    assert found[f"{name}.slow_to_close"].duration >= 0.05
    assert "aclose()" in found[f"{name}.slow_to_close"].message


@pytest.mark.skipif(not PY311, reason="needs Task.cancelling() (3.11+)")
def test_generator_swallowing_cancellation_is_found(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(MISTAKES)
    otel.install(f"{name}:deaf_stream")
    mod = importlib.import_module(name)

    async def main() -> list[int]:
        async def consume() -> list[int]:
            return [i async for i in mod.deaf_stream()]

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        return await task

    assert run_on(loop_factory, main()) == [0, 1, 2]
    assert kinds() == [_names.SWALLOWED_CANCELLATION]


# -- telemetry ----------

NESTING = '''
import asyncio
import contextlib
import gc
from opentelemetry import trace

class Outer:
    async def __aenter__(self):
        return self
    async def __aexit__(self, *exc):
        return None

async def numbers(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i
'''


def test_body_runs_with_the_async_with_span_current(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(NESTING)
    otel.install(f"{name}.*")
    mod = importlib.import_module(name)
    tracer = otel.tracer_provider.get_tracer("test")

    async def main() -> None:
        with tracer.start_as_current_span("request"):
            async with mod.Outer():
                with tracer.start_as_current_span("query"):
                    await asyncio.sleep(0)
                async for _ in mod.numbers(20):
                    pass
            with tracer.start_as_current_span("after"):
                pass

    run_on(loop_factory, main())
    spans = {s.name: s for s in otel.finished()}
    outer = spans["async with Outer"]
    assert outer.parent.span_id == spans["request"].context.span_id
    assert spans["query"].parent.span_id == outer.context.span_id
    assert spans["async for numbers"].parent.span_id == outer.context.span_id
    assert spans["after"].parent.span_id == spans["request"].context.span_id
    it = spans["async for numbers"]
    assert it.attributes["asyncdiag.items"] == 20
    assert it.attributes[_names.ATTR_OUTCOME] == "ok"
    assert it.attributes["asyncdiag.gap.mean"] > 0
    assert outer.attributes["asyncdiag.enter.duration"] >= 0
    assert outer.attributes[_names.ATTR_SUBJECT] == f"{name}.Outer"
    assert it.attributes["code.filepath"] == __file__
    # One span per iteration, none per item.
    assert len(otel.finished("async for")) == 1
    nexts = {p.attributes[_names.ATTR_SUBJECT]: p for p in otel.points(
        _names.ITERATOR_NEXT_DURATION.name)}
    stride = _proxies.TIMING_STRIDE  # the first item, then one in `stride`, is timed
    assert nexts[f"{name}.numbers"].count == (20 + stride - 1) // stride


def test_unsampled_tracing_creates_no_spans_and_changes_no_context(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules,
) -> None:
    with otel_for(sampled=False) as otel:
        name = modules.write(NESTING)
        otel.install(f"{name}.*")
        mod = importlib.import_module(name)
        assert _proxies.RUNTIME is not None and not _proxies.RUNTIME.tracing

        async def main() -> int:
            async with mod.Outer():
                return sum([i async for i in mod.numbers(5)])

        assert run_on(loop_factory, main()) == 10
        assert otel.finished() == []
        exits = otel.points(_names.CONTEXT_EXIT_DURATION.name)
        assert [p.attributes[_names.ATTR_OUTCOME] for p in exits] == ["ok"]


def test_exit_outcomes_in_metrics(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
    record_since: str,
) -> None:
    name = modules.write(NESTING + MISTAKES.replace("import asyncio", ""))
    otel.install(f"{name}:Outer", f"{name}:Forgiving")
    mod = importlib.import_module(name)

    async def main() -> None:
        async with mod.Outer():
            pass
        with pytest.raises(KeyError):
            async with mod.Outer():
                raise KeyError
        async with mod.Forgiving():
            raise KeyError

        async def cancelled() -> None:
            async with mod.Outer():
                await asyncio.sleep(10)

        task = asyncio.ensure_future(cancelled())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_on(loop_factory, main())
    outcomes = {p.attributes[_names.ATTR_OUTCOME]: p.count for p in otel.points(
        _names.CONTEXT_EXIT_DURATION.name)}
    assert outcomes == {"ok": 1, "error": 1, "suppressed": 1, "cancelled": 1}


TIMED = '''
import asyncio

class Timed:
    async def __aenter__(self):
        await asyncio.sleep(0.02)
        return self
    async def __aexit__(self, exc_type, exc, tb):
        await asyncio.sleep(0.03)
'''


def test_traced_blocks_use_the_implementation_chosen(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
    hot_paths: str,
) -> None:
    name = modules.write(TIMED)
    otel.install(f"{name}:Timed")
    mod = importlib.import_module(name)
    seen: list[str] = []

    async def main() -> None:
        async with mod.Timed():
            rt = _proxies.RUNTIME
            assert rt is not None
            seen.extend(type(record).__name__ for record in rt.open.values())

    run_on(loop_factory, main())
    assert seen == (["Block"] if hot_paths == "c-hot-paths" else ["_Open"])
    assert len(otel.finished("async with")) == 1


COUNTED = '''
async def numbers(n):
    for i in range(n):
        yield i
'''


def test_generator_requests_are_counted_by_the_implementation_chosen(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, hot_paths: str,
) -> None:
    with otel_for(sampled=False) as otel:
        name = modules.write(COUNTED)
        otel.install(f"{name}:numbers")
        mod = importlib.import_module(name)
        kinds: list[str] = []

        async def main() -> list[int]:
            gen = mod.numbers(100)
            kinds.append(type(aiter(gen)).__name__)
            return [i async for i in gen]

        assert run_on(loop_factory, main()) == list(range(100))
        if hot_paths == "c-hot-paths":
            expected = "_Counted"  # every version: the C extension's __anext__ slot
        else:
            expected = "_CountedPython" if sys.version_info >= (3, 12) else "async_generator"
        assert kinds == [expected]
        gc.collect()
        (point,) = otel.points(_names.ITERATOR_NEXT_DURATION.name)
        assert point.count == 4  # requests 1, 33, 65 and 97
        (yields,) = otel.points(_names.ITERATOR_YIELDS.name)
        assert yields.value == 100


@pytest.mark.parametrize("sampled", [False, True])
def test_enter_and_exit_durations_are_the_awaited_times(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, sampled: bool,
    record_since: str,
) -> None:
    with otel_for(sampled=sampled) as otel:
        name = modules.write(TIMED)
        otel.install(f"{name}:Timed")
        mod = importlib.import_module(name)

        async def main() -> None:
            for _ in range(3):
                async with mod.Timed():
                    time.sleep(0.05)  # the body: in neither duration

        run_on(loop_factory, main())
        (enter,) = otel.points(_names.CONTEXT_ENTER_DURATION.name)
        (exit_,) = otel.points(_names.CONTEXT_EXIT_DURATION.name)
        assert enter.count == exit_.count == 3
        # uvloop's timers have millisecond resolution; with the body's 50 ms in a duration,
        # it would be 70 ms or more.
        assert enter.min >= 0.015 and enter.max < 0.05, (enter.min, enter.max)
        assert exit_.min >= 0.025 and exit_.max < 0.07, (exit_.min, exit_.max)
        if sampled:
            spans = otel.finished("async with")
            assert len(spans) == 3
            for span in spans:
                assert 0.015 <= span.attributes["asyncdiag.enter.duration"] < 0.05
                assert 0.025 <= span.attributes["asyncdiag.exit.duration"] < 0.07


# -- targets ----------

TARGETS = '''
import asyncio
import contextlib
import gc
from contextlib import asynccontextmanager

class Base:
    async def __aenter__(self):
        return "base"
    async def __aexit__(self, *exc):
        return None

class Inherits(Base):
    pass

class Overrides(Base):
    async def __aenter__(self):
        return ("override", await super().__aenter__())

class Feed:
    @classmethod
    async def items(cls, n):
        for i in range(n):
            yield (cls.__name__, i)

    @staticmethod
    async def plain(n):
        for i in range(n):
            yield i

    @classmethod
    @asynccontextmanager
    async def session(cls):
        yield cls.__name__

async def rows(n):
    for i in range(n):
        yield i

alias = rows

class NotAsync:
    def __enter__(self):
        return self

def helper():
    return 1
'''


def _spans_by_subject(otel: Otel) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in otel.finished():
        key = s.attributes[_names.ATTR_SUBJECT]
        counts[key] = counts.get(key, 0) + 1
    return counts


async def _exercise_targets(mod: types.ModuleType) -> list[Any]:
    out: list[Any] = []
    for cls in (mod.Base, mod.Inherits, mod.Overrides):
        async with cls() as value:
            out.append(value)
    out.append([x async for x in mod.Feed.items(2)])
    out.append([x async for x in mod.Feed().plain(2)])
    async with mod.Feed.session() as s:
        out.append(s)
    out.append([x async for x in mod.alias(2)])
    return out


def test_targets_classes_subclasses_methods_and_aliases(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(TARGETS)
    mod = importlib.import_module(name)  # imported BEFORE install: patched at install
    expected = run_on(loop_factory, _exercise_targets(mod))
    otel.install(f"{name}:Base", f"{name}:Feed.items", f"{name}:Feed.plain",
                 f"{name}:Feed.session", f"{name}:rows")
    got = run_on(loop_factory, _exercise_targets(mod))
    assert got == expected
    counts = _spans_by_subject(otel)
    # Inherits is measured (as Base); Overrides' own __aenter__ hides Base's: not measured,
    # and Base's __aenter__ called through super() is not measured twice.
    assert counts == {
        f"{name}.Base": 2, f"{name}.Feed.items": 1, f"{name}.Feed.plain": 1,
        f"{name}.Feed.session": 1, f"{name}.rows": 1,
    }
    assert isinstance(mod.Feed.__dict__["items"], _proxies.InstrumentedFunction)
    assert mod.alias is mod.rows  # the re-export points at the same instrumented function
    asyncdiag.uninstall()
    assert inspect.isasyncgenfunction(mod.rows) and not isinstance(
        mod.rows, _proxies.InstrumentedFunction)
    assert mod.alias is mod.rows
    assert isinstance(mod.Feed.__dict__["items"], classmethod)
    assert not hasattr(mod.Base.__aenter__, "__asyncdiag_instrumented__")


def test_glob_instruments_what_is_defined_there_once(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(TARGETS)
    reexporter = modules.write(f"from {name} import rows as exported_rows, Base\n")
    otel.install(f"{name}", f"{name[:4]}*")  # the exact module name is a glob too
    mod = importlib.import_module(name)
    other = importlib.import_module(reexporter)
    expected_types = [mod.Base, mod.Inherits, mod.Overrides]
    got = run_on(loop_factory, _exercise_targets(mod))
    assert got[:3] == ["base", "base", ("override", "base")]
    assert other.exported_rows is mod.rows
    counts = _spans_by_subject(otel)
    assert counts[f"{name}.Base"] == 1
    assert counts[f"{name}.Inherits"] == 1
    assert counts[f"{name}.Overrides"] == 1  # its own wrapper; Base's passes through
    assert counts[f"{name}.rows"] == 1  # through the alias
    assert all(t.__module__ == name for t in expected_types)


def test_target_module_imported_later_and_uninstall_restores(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(TARGETS)
    otel.install(f"{name}:Base", f"{name}:rows")
    assert name not in sys.modules
    mod = importlib.import_module(name)
    original_aenter = mod.Base.__dict__["__aenter__"].__wrapped__
    assert isinstance(mod.rows, _proxies.InstrumentedFunction)
    run_on(loop_factory, _exercise_targets(mod))
    asyncdiag.uninstall()
    assert mod.Base.__dict__["__aenter__"] is original_aenter
    assert not isinstance(mod.rows, _proxies.InstrumentedFunction)
    assert not any(isinstance(f, type) and f.__module__ == "asyncdiag._targets"
                   for f in sys.meta_path)
    # A module imported after uninstall is not patched by a left-over hook.
    name2 = modules.write(TARGETS)
    otel.install(f"{name2}:Base")
    asyncdiag.uninstall()
    mod2 = importlib.import_module(name2)
    assert not hasattr(mod2.Base.__aenter__, "__asyncdiag_instrumented__")


def test_bad_targets_warn_once_and_the_program_runs_on(
    modules: Modules, otel: Otel, caplog: pytest.LogCaptureFixture,
) -> None:
    name = modules.write(TARGETS)
    caplog.set_level(logging.WARNING, logger="asyncdiag")
    otel.install(f"{name}:Missing", f"{name}:NotAsync", f"{name}:helper",
                 "no_such_module_adx:Thing")
    importlib.import_module(name)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Missing" in m for m in messages) == 1
    assert sum("NotAsync" in m and "not an async context manager" in m for m in messages) == 1
    assert sum("helper" in m for m in messages) == 1
    assert sum("no_such_module_adx" in m for m in messages) == 1


# -- the decorator ----------

DECORATED = '''
import asyncio
import contextlib
import gc
from contextlib import asynccontextmanager
import asyncdiag

@asyncdiag.instrument
class Pool:
    async def __aenter__(self):
        return self
    async def __aexit__(self, *exc):
        return None

@asyncdiag.instrument
async def stream(n):
    for i in range(n):
        yield i

@asyncdiag.instrument
@asynccontextmanager
async def session():
    yield "s"

twice = asyncdiag.instrument(stream)
'''


def test_decorator_without_agent_is_invisible_and_measures_once_installed(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    mod = importlib.import_module(modules.write(DECORATED))

    async def main() -> list[Any]:
        out: list[Any] = []
        async with mod.Pool() as p:
            out.append(type(p).__name__)
        gen = mod.stream(3)
        out.append(type(gen))
        out.append([x async for x in gen])
        async with mod.session() as s:
            out.append(s)
        return out

    assert mod.twice is mod.stream
    plain = run_on(loop_factory, main())
    assert plain[1] is types.AsyncGeneratorType  # exactly the generator, no proxy
    assert "__asyncdiag_instrumented__" not in dir(mod.Pool.__aenter__)
    otel.install()
    measured = run_on(loop_factory, main())
    assert measured[0] == plain[0] and measured[2:] == plain[2:]
    assert measured[1] is _proxies.AsyncGenProxy
    assert {s.name for s in otel.finished()} == {
        "async with Pool", "async for stream", "async with session"}
    asyncdiag.uninstall()
    assert not hasattr(mod.Pool.__aenter__, "__asyncdiag_instrumented__")
    assert run_on(loop_factory, main()) == plain


def test_decorating_a_non_async_object_warns_and_returns_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def helper() -> int:
        return 1

    assert asyncdiag.instrument(helper) is helper
    assert "not an async context manager" in caplog.text


# -- transparency ----------

TRANSPARENCY = '''
import asyncio
import contextlib
import gc

class Raises:
    async def __aenter__(self):
        await asyncio.sleep(0)
        raise LookupError("from enter")
    async def __aexit__(self, *exc):
        return None

async def failing(n):
    for i in range(n):
        yield i
    raise LookupError("from generator")

async def echo():
    received = []
    try:
        while True:
            value = yield len(received)
            received.append(value)
    except GeneratorExit:
        received.append("closed")
        raise
    except KeyError as exc:
        yield ("caught", exc.args)
'''


def _frames(exc: BaseException) -> list[str]:
    return [f.name for f in traceback.extract_tb(exc.__traceback__)]


def test_same_exceptions_tracebacks_types_and_protocol(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    plain = importlib.import_module(modules.write(TRANSPARENCY))
    name = modules.write(TRANSPARENCY)
    otel.install(f"{name}.*")
    mod = importlib.import_module(name)

    async def scenario(m: types.ModuleType) -> list[Any]:
        out: list[Any] = []
        try:
            async with m.Raises():
                pass
        except LookupError as exc:
            out.append(("enter", exc.args, _frames(exc)))
        try:
            async for _ in m.failing(2):
                pass
        except LookupError as exc:
            out.append(("gen", exc.args, _frames(exc)))
        gen = m.echo()
        out.append(inspect.isasyncgen(gen))
        out.append(isinstance(gen, types.AsyncGeneratorType))
        out.append(gen.__name__)
        out.append(await gen.asend(None))
        out.append(await gen.asend("a"))
        out.append(await gen.athrow(KeyError("k")))
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()
        gen2 = m.echo()
        await gen2.__anext__()
        await gen2.aclose()
        with pytest.raises(StopAsyncIteration):
            await gen2.__anext__()
        out.append(gen2.ag_frame is None)
        return out

    expected = run_on(loop_factory, scenario(plain))
    got = run_on(loop_factory, scenario(mod))
    if not PY311:  # 3.10's bare `raise` keeps our frame in the traceback
        for entry in got[:2]:
            entry[2][:] = [f for f in entry[2] if f not in ("__aenter__", "_observe")] + []
        for entry in expected[:2]:
            entry[2][:] = [f for f in entry[2] if f != "__aenter__"]
    assert got == expected


def test_the_same_exception_object_comes_out(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(TRANSPARENCY + NESTING.replace("import asyncio", ""))
    otel.install(f"{name}.*")
    mod = importlib.import_module(name)
    raised = ValueError("mine")

    async def main() -> None:
        try:
            async with mod.Outer():
                raise raised
        except ValueError as exc:
            assert exc is raised
            assert _frames(exc) == ["main"]
        else:  # pragma: no cover
            raise AssertionError("swallowed")

    run_on(loop_factory, main())


# -- the patched dunders as objects: what code that calls them by hand sees -----------------------

BY_HAND = '''
import asyncio

class Step:
    """Suspends once, yielding "step"; returns what was sent in."""
    def __await__(self):
        return (yield "step")

class Driven:
    """Awkward return values: a tuple, an exception object, a caught exception's args."""
    async def __aenter__(self):
        got = await Step()
        return (got, "tuple")
    async def __aexit__(self, exc_type, exc, tb):
        try:
            await Step()
        except KeyError as caught:
            return ("caught", caught.args)
        return StopIteration("a value")

class FutureBased:
    """Plain methods returning other awaitables: a Future, an object with __await__."""
    def __aenter__(self):
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.set_result, "entered")
        return future
    def __aexit__(self, exc_type, exc, tb):
        return Suppresses(exc_type)

class Suppresses:
    def __init__(self, exc_type):
        self.exc_type = exc_type
    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        return self.exc_type is KeyError

class RaisesWhenCalled:
    async def __aenter__(self):
        return self
    def __aexit__(self, exc_type, exc, tb):
        raise OSError("when called")

class NotAwaitable:
    def __aenter__(self):
        return 42
    async def __aexit__(self, exc_type, exc, tb):
        return None
'''


def _outcome_of(step: Callable[[], Any]) -> tuple[str, str]:
    try:
        return ("value", repr(step()))
    except StopIteration as stop:
        return ("stop", repr(stop.value))
    except BaseException as exc:  # what came out is what is compared
        return ("raised", f"{type(exc).__name__}: {exc}")


def _drive_by_hand(mod: types.ModuleType) -> list[Any]:
    """The coroutine protocol on what ``__aenter__``/``__aexit__`` return, without a loop."""
    obj = mod.Driven()
    out: list[Any] = []
    c = obj.__aenter__()
    out.append((asyncio.iscoroutine(c), inspect.iscoroutine(c), inspect.isawaitable(c),
                isinstance(c, Coroutine), c.__qualname__, c.cr_code.co_name, repr(c)[:36]))
    out.append(_outcome_of(lambda: c.send(None)))
    out.append(_outcome_of(lambda: c.send("sent")))
    out.append(_outcome_of(lambda: c.send(None)))  # reused
    c = obj.__aexit__(None, None, None)
    out.append(_outcome_of(lambda: c.send(None)))
    out.append(_outcome_of(lambda: c.throw(KeyError("k"))))  # caught inside: returned
    c = obj.__aexit__(None, None, None)
    c.send(None)
    out.append(_outcome_of(lambda: c.send(None)))  # returns an exception object
    c = obj.__aexit__(None, None, None)
    out.append(_outcome_of(lambda: c.throw(ValueError("before the first step"))))
    out.append(_outcome_of(lambda: c.send(None)))
    c = obj.__aenter__()
    out.append(_outcome_of(c.close))  # before the first step
    c = obj.__aenter__()
    c.send(None)
    out.append(_outcome_of(c.close))  # suspended
    out.append(_outcome_of(lambda: c.send(None)))
    it = obj.__aenter__().__await__()
    out.append(_outcome_of(lambda: next(it)))
    out.append(_outcome_of(lambda: it.send(1)))
    c = obj.__aexit__(exc_type=None, exc=None, tb=None)  # by keyword
    c.send(None)
    out.append(_outcome_of(lambda: c.send(None)))
    return out


def _exit_outcomes(otel: Otel) -> dict[str, int]:
    return {p.attributes[_names.ATTR_OUTCOME]: p.count
            for p in otel.points(_names.CONTEXT_EXIT_DURATION.name)}


def _introspect(cls: type) -> list[Any]:
    obj = cls()
    out: list[Any] = []
    for name in ("__aenter__", "__aexit__"):
        function, method = getattr(cls, name), getattr(obj, name)
        out.append((
            inspect.isfunction(function), inspect.iscoroutinefunction(function),
            inspect.iscoroutinefunction(method), inspect.ismethod(method),
            method.__self__ is obj, str(inspect.signature(method)),
            str(inspect.signature(function)), function.__name__, function.__qualname__,
            function.__module__ == cls.__module__, function.__doc__,
            repr(function).split(" at ")[0],
        ))
    return out


def test_the_patched_dunders_introspect_as_the_originals(modules: Modules, otel: Otel) -> None:
    plain = importlib.import_module(modules.write(BY_HAND))
    name = modules.write(BY_HAND)
    otel.install(f"{name}:Driven", f"{name}:FutureBased")
    mod = importlib.import_module(name)
    for cls_name in ("Driven", "FutureBased"):
        cls = getattr(mod, cls_name)
        original = vars(getattr(plain, cls_name))["__aexit__"]
        assert getattr(cls.__aexit__, "__asyncdiag_instrumented__", False)
        assert cls.__aexit__.__wrapped__.__code__.co_code == original.__code__.co_code
        expected = _introspect(getattr(plain, cls_name))
        if cls_name == "FutureBased":
            # Plain methods returning awaitables are wrapped as coroutine functions (as the
            # Python wrapper always was): the one answer that differs.
            for i in range(2):
                expected[i] = (*expected[i][:1], True, True, *expected[i][3:])
        assert _introspect(cls) == expected


@pytest.mark.parametrize("sampled", [False, True], ids=["metrics", "traced"])
def test_what_the_patched_dunders_return_is_driven_as_the_originals_coroutine(
    modules: Modules, sampled: bool,
) -> None:
    """send, throw, close and __await__, before, during and after, with values that need
    care (a tuple, an exception object): as on the original's coroutine; no warning; and what
    ran is measured as the reference measures it (a close while suspended is an error)."""
    import warnings

    plain = importlib.import_module(modules.write(BY_HAND))
    with warnings.catch_warnings(record=True) as plain_warnings:
        warnings.simplefilter("always")
        expected = _drive_by_hand(plain)
        gc.collect()
    name = modules.write(BY_HAND)
    with otel_for(sampled=sampled) as otel, warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        otel.install(f"{name}:Driven")
        got = _drive_by_hand(importlib.import_module(name))
        gc.collect()
        entered = otel.points(_names.CONTEXT_ENTER_DURATION.name)
        exits = _exit_outcomes(otel)
    assert got == expected
    assert [str(w.message) for w in ours] == [str(w.message) for w in plain_warnings] == []
    # Enters that ran: returned (first), closed while suspended (an error), via __await__.
    assert [p.count for p in entered] == [3]
    # Exits that ran: the KeyError caught inside, the exception object, the keyword call.
    assert exits == {"ok": 3}


def test_originals_that_return_other_awaitables_or_raise_when_called(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
    hot_paths: str,
) -> None:
    plain = importlib.import_module(modules.write(BY_HAND))
    name = modules.write(BY_HAND)
    otel.install(f"{name}:FutureBased", f"{name}:RaisesWhenCalled", f"{name}:NotAwaitable")
    mod = importlib.import_module(name)

    async def scenario(m: types.ModuleType) -> list[Any]:
        out: list[Any] = []
        async with m.FutureBased() as entered:
            out.append(entered)
        async with m.FutureBased():
            raise KeyError("suppressed by the awaitable's result")
        for cls in (m.RaisesWhenCalled, m.NotAwaitable):
            try:
                async with cls():
                    out.append("body")
            except Exception as exc:
                # A non-awaitable from __aenter__: the interpreter words the TypeError for
                # `async with`; measured, it is awaited, and worded as for `await`.
                message = str(exc) if cls is m.RaisesWhenCalled else ""
                frames = _frames(exc)
                if not PY311 and hot_paths == "python-hot-paths" and m is mod:
                    del frames[1]  # 3.10's bare `raise` keeps the Python wrapper's frame
                out.append((type(exc).__name__, message, frames))
        return out

    assert run_on(loop_factory, scenario(mod)) == run_on(loop_factory, scenario(plain))
    exits = {(p.attributes[_names.ATTR_SUBJECT].rsplit(".", 1)[-1],
              p.attributes[_names.ATTR_OUTCOME]): p.count
             for p in otel.points(_names.CONTEXT_EXIT_DURATION.name)}
    assert exits == {("FutureBased", "ok"): 1, ("FutureBased", "suppressed"): 1,
                     ("RaisesWhenCalled", "error"): 1}
    enters = {p.attributes[_names.ATTR_SUBJECT].rsplit(".", 1)[-1]: p.count
              for p in otel.points(_names.CONTEXT_ENTER_DURATION.name)}
    assert enters == {"FutureBased": 2, "RaisesWhenCalled": 1, "NotAwaitable": 1}


@pytest.mark.parametrize("how", ["closed", "collected", "own-coroutine-collected"])
def test_an_exit_abandoned_while_suspended_is_recorded_once_as_an_error(
    modules: Modules, otel: Otel, how: str,
) -> None:
    name = modules.write(BY_HAND)
    otel.install(f"{name}:Driven")
    mod = importlib.import_module(name)
    unraisable: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        if how == "own-coroutine-collected":
            c = mod.Driven().__aexit__(None, None, None)
            c.send(None)
            del c
        else:
            async def user() -> None:
                async with mod.Driven():
                    pass

            coro = user()
            coro.send(None)  # suspended in __aenter__
            coro.send(None)  # __aenter__ returned; the body ran; suspended in __aexit__
            if how == "closed":
                coro.close()
            del coro
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert unraisable == []
    assert _exit_outcomes(otel) == {"error": 1}


def test_uninstall_between_the_call_and_the_first_step_leaves_the_original_alone(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(SEED)
    otel.install(f"{name}:Resource")
    mod = importlib.import_module(name)
    log: list[Any] = []

    async def main() -> Any:
        res = mod.Resource("r", log)
        entering = res.__aenter__()
        asyncdiag.uninstall()
        entered = await entering
        await entered.__aexit__(None, None, None)
        return entered is res

    assert run_on(loop_factory, main()) is True
    assert log == [("enter", "r"), ("exit", "r", None)]
    assert otel.points(_names.CONTEXT_ENTER_DURATION.name) == []


@pytest.mark.parametrize("sampled", [False, True], ids=["metrics", "traced"])
def test_an_internal_error_is_logged_once_and_measuring_stops(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, sampled: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncdiag's own failure (here: a threshold that cannot be compared with a duration)
    inside a wrapper: logged once, the block still returns what it returns, and every wrapper
    passes through from then on."""
    name = modules.write(SEED)
    log: list[Any] = []
    with otel_for(sampled=sampled) as otel:
        otel.install(f"{name}:Resource")
        mod = importlib.import_module(name)
        runtime = _proxies.RUNTIME
        assert runtime is not None
        runtime.slow_teardown = "not a number"  # type: ignore[assignment]

        async def main() -> list[Any]:
            entered = []
            for i in range(3):
                async with mod.Resource(f"r{i}", log) as res:
                    entered.append(res.name)
            return entered

        assert run_on(loop_factory, main()) == ["r0", "r1", "r2"]
        assert _proxies.RUNTIME is None
        assert len(log) == 6
        errors = [r for r in caplog.records if "internal error in instrumentation" in
                  r.getMessage()]
        assert len(errors) == 1 and isinstance(errors[0].exc_info[1], TypeError)
        # The first block's enter and exit were recorded before the comparison failed.
        assert [p.count for p in otel.points(_names.CONTEXT_ENTER_DURATION.name)] == [1]
        assert _exit_outcomes(otel) == {"ok": 1}


def test_orphaned_generator_span_ends_when_collected(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(NESTING)
    otel.install(f"{name}:numbers")
    mod = importlib.import_module(name)

    async def main() -> None:
        async for i in mod.numbers(10):
            if i == 2:
                break
        await asyncio.sleep(0.01)

    run_on(loop_factory, main())
    [span] = otel.finished("async for")
    assert span.attributes[_names.ATTR_OUTCOME] == "orphaned"
    assert span.attributes["asyncdiag.items"] == 3
    # The orphaned-generator detector names the user's generator, not our delegate.
    orphaned = [f for f in asyncdiag.findings() if f.kind == _names.ORPHANED_ASYNCGEN]
    assert all(f.subject.endswith("numbers") for f in orphaned), orphaned


def test_uninstall_while_a_block_is_open_does_not_break_it(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    name = modules.write(NESTING)
    otel.install(f"{name}.*")
    mod = importlib.import_module(name)

    from opentelemetry import trace

    async def main() -> list[int]:
        out = []
        gen = mod.numbers(4)
        async with mod.Outer():
            out.append(await gen.__anext__())
            asyncdiag.uninstall()
            out.extend([i async for i in gen])
            # The block's span ended with the agent and is no longer current.
            assert not trace.get_current_span().is_recording()
        return out

    assert run_on(loop_factory, main()) == [0, 1, 2, 3]
    [span] = otel.finished("async with Outer")
    assert span.attributes[_names.ATTR_OUTCOME] == "abandoned"


def test_exits_in_other_tasks_leave_no_ended_span_current(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opentelemetry import trace

    name = modules.write(SEED)
    otel.install(f"{name}:Resource")
    seed = importlib.import_module(name)
    tracer = otel.tracer_provider.get_tracer("test")
    caplog.set_level(logging.DEBUG)

    async def main() -> bool:
        with tracer.start_as_current_span("request") as request:
            log: list[Any] = []
            resources = [seed.Resource(f"r{i}", log) for i in range(3)]
            for res in resources:
                await res.__aenter__()  # the seed's pattern: entered here, exited elsewhere
            await seed.parallel_resource_teardown(resources)
            async with seed.Resource("after", log):
                pass
            return trace.get_current_span() is request

    assert run_on(loop_factory, main()) is True
    spans = otel.finished("async with Resource")
    assert len(spans) == 4
    request = next(s for s in otel.finished() if s.name == "request")
    assert spans[-1].parent.span_id == request.context.span_id
    assert not [r for r in caplog.records if "detach" in r.getMessage().lower()]


def test_an_object_that_cannot_be_patched_costs_one_warning(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = modules.write(TARGETS + '''

class Frozen(type):
    def __setattr__(cls, key, value):
        raise TypeError("read-only class")

class Locked(metaclass=Frozen):
    async def __aenter__(self):
        return "locked"
    async def __aexit__(self, *exc):
        return None
''')
    caplog.set_level(logging.WARNING, logger="asyncdiag")
    otel.install(f"{name}.*")
    mod = importlib.import_module(name)

    async def main() -> list[Any]:
        async with mod.Locked() as value:
            pass
        return [value, [x async for x in mod.rows(2)]]

    assert run_on(loop_factory, main()) == ["locked", [0, 1]]
    assert sum("could not instrument" in r.getMessage() for r in caplog.records) == 1
    assert {s.name for s in otel.finished()} == {"async for rows"}


def test_container_activation_by_environment_only(tmp_path: Path) -> None:
    """ASYNCDIAG_ENABLED + ASYNCDIAG_INSTRUMENT, no code change: the package imported later
    by the program is patched, and its mistake is reported with the program's line."""
    import os
    import subprocess

    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "db.py").write_text(textwrap.dedent(MISTAKES))
    (tmp_path / "app.py").write_text(textwrap.dedent('''
        import asyncio
        from shop.db import Forgiving

        async def main():
            async with Forgiving():
                raise ValueError("lost")

        asyncio.run(main())
        print("done")
    '''))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCDIAG_", "OTEL_"))}
    env.update(ASYNCDIAG_ENABLED="1", ASYNCDIAG_INSTRUMENT="shop.*", ASYNCDIAG_EXPORTER="none",
               PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, str(tmp_path / "app.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "[swallowed_exception] Forgiving.__aexit__" in proc.stderr
    assert f"{tmp_path / 'app.py'}:6" in proc.stderr


ITERATORS = '''
import asyncio
import contextlib
import gc

class Countdown:
    def __init__(self, n):
        self.n = n
    def __aiter__(self):
        return self
    async def __anext__(self):
        await asyncio.sleep(0)
        if self.n == 0:
            raise StopAsyncIteration
        self.n -= 1
        return self.n
'''


def test_class_iterator_spans_end_on_exhaustion_and_when_abandoned(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, otel: Otel,
) -> None:
    import gc

    name = modules.write(ITERATORS)
    otel.install(f"{name}:Countdown")
    mod = importlib.import_module(name)

    async def main() -> list[int]:
        done = [i async for i in mod.Countdown(3)]
        async for i in mod.Countdown(5):
            if i == 3:
                break
        gc.collect()
        return done

    assert run_on(loop_factory, main()) == [2, 1, 0]
    outcomes = sorted((s.attributes[_names.ATTR_OUTCOME], s.attributes["asyncdiag.items"])
                      for s in otel.finished("async for Countdown"))
    assert outcomes == [("ok", 3), ("orphaned", 2)]
    yields = {p.attributes[_names.ATTR_SUBJECT]: p.value
              for p in otel.points(_names.ITERATOR_YIELDS.name)}
    assert yields[f"{name}.Countdown"] == 5


def test_loops_in_other_threads_are_measured_too(modules: Modules, otel: Otel) -> None:
    import threading

    name = modules.write(NESTING)
    otel.install(f"{name}.*")
    mod = importlib.import_module(name)
    results: list[int] = []

    async def work() -> int:
        total = 0
        for _ in range(20):
            async with mod.Outer():
                total += sum([i async for i in mod.numbers(3)])
        return total

    threads = [threading.Thread(target=lambda: results.append(asyncio.run(work())))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [60, 60, 60]
    assert len(otel.finished("async with Outer")) == 60
    assert len(otel.finished("async for numbers")) == 60


def test_targets_of_a_module_that_installs_before_defining_them(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A module calling install() at its top names classes it defines further down: they are
    patched once a loop runs, without a spurious "no attribute" warning."""
    caplog.set_level(logging.WARNING, logger="asyncdiag")
    name = modules.write('''
import asyncdiag
asyncdiag.install(instrument=[__name__ + ":Forgiving", __name__ + ".*"], exporter="none")
''' + MISTAKES)
    mod = importlib.import_module(name)

    async def main() -> None:
        await asyncio.sleep(0)
        async with mod.Forgiving():
            raise ValueError("lost")

    run_on(loop_factory, main())
    assert kinds() == [_names.SWALLOWED_EXCEPTION]
    assert hasattr(mod.SlowClose.__aexit__, "__asyncdiag_instrumented__")
    assert not [r for r in caplog.records if "no attribute" in r.getMessage()]


def test_parent_based_sampling_is_followed_without_asking_the_sdk(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules,
) -> None:
    from opentelemetry import context, trace
    from opentelemetry.sdk.trace.sampling import ParentBased
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    otel = Otel()
    otel.tracer_provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    otel.tracer_provider.add_span_processor(SimpleSpanProcessor(otel.spans))
    try:
        name = modules.write(NESTING)
        otel.install(f"{name}:Outer")
        mod = importlib.import_module(name)
        assert _proxies.RUNTIME is not None and _proxies.RUNTIME.mode == 1  # FOLLOW_PARENT

        def remote_parent(sampled: bool) -> Any:
            flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
            parent = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=flags)
            return trace.set_span_in_context(NonRecordingSpan(parent))

        async def main() -> None:
            async with mod.Outer():  # no parent: the root sampler drops it
                pass
            for sampled in (False, True):
                token = context.attach(remote_parent(sampled))
                try:
                    async with mod.Outer():
                        pass
                finally:
                    context.detach(token)

        run_on(loop_factory, main())
        [span] = otel.finished("async with Outer")
        assert span.parent.span_id == 0x5678 and span.context.trace_id == 0x1234
    finally:
        asyncdiag.uninstall()
        otel.shutdown()


def test_may_suspend_is_false_only_for_an_async_def_that_never_awaits() -> None:
    """A cancellation can only be delivered at a suspension: exits that cannot suspend skip
    the cancellation bookkeeping (on 3.10/3.11 finding the task costs a system call)."""

    async def releases(self: object, *exc: object) -> None:
        del exc

    async def awaits(self: object, *exc: object) -> None:
        await asyncio.sleep(0)

    async def iterates(self: object, *exc: object) -> None:
        async for _ in aiter_of():
            pass

    async def enters(self: object, *exc: object) -> None:
        async with contextlib.AsyncExitStack():
            pass

    async def aiter_of() -> AsyncIterator[int]:
        yield 1

    assert not _proxies.may_suspend(releases)
    assert all(_proxies.may_suspend(f) for f in (awaits, iterates, enters))
    assert _proxies.may_suspend(lambda self, *exc: releases(self, *exc))  # opaque: assume so
    assert _proxies.may_suspend(object())


# -- item counts and per-request timing, traced and metrics-only ----------------------------------

COUNTING = '''
import asyncio
import contextlib
import gc
import time


async def numbers(n, fail_at=None):
    for i in range(n):
        if i == fail_at:
            raise ValueError(i)
        yield i


async def catcher():
    try:
        yield 0
    except KeyError:
        yield -1
    yield 1
'''


async def _exhaust(mod: Any) -> list[int]:
    return [i async for i in mod.numbers(70)]


async def _break_and_drop(mod: Any) -> list[int]:
    got = []
    async for i in mod.numbers(70):
        got.append(i)
        if i == 40:
            break
    return got


async def _break_and_aclose(mod: Any) -> list[int]:
    gen = mod.numbers(70)
    got = []
    async for i in gen:
        got.append(i)
        if i == 5:
            break
    await gen.aclose()
    return got


async def _error(mod: Any) -> list[int]:
    got: list[int] = []
    with pytest.raises(ValueError):
        async for i in mod.numbers(70, fail_at=50):
            got.append(i)
    return got


async def _asend_then_iterate(mod: Any) -> list[int]:
    gen = mod.numbers(10)
    got = [await gen.asend(None), await gen.asend(1)]
    got += [i async for i in gen]
    return got


async def _athrow(mod: Any) -> list[int]:
    gen = mod.catcher()
    got = [await gen.__anext__(), await gen.athrow(KeyError("k"))]
    got += [i async for i in gen]
    return got


async def _iterate_twice(mod: Any) -> list[int]:
    gen = mod.numbers(3)
    got = [i async for i in gen]
    got += [i async for i in gen]
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    return got


async def _aclosing_after_exhaustion(mod: Any) -> list[int]:
    async with contextlib.aclosing(mod.numbers(4)) as gen:
        return [i async for i in gen]


@pytest.mark.parametrize("sampled", [True, False], ids=["traced", "metrics-only"])
@pytest.mark.parametrize("consume", [
    _exhaust, _break_and_drop, _break_and_aclose, _error, _asend_then_iterate, _athrow,
    _iterate_twice, _aclosing_after_exhaustion,
], ids=lambda f: f.__name__.strip("_"))
def test_yields_count_the_items_the_consumer_received(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules,
    sampled: bool, consume: Callable[[Any], Coroutine[Any, Any, list[int]]],
) -> None:
    with otel_for(sampled=sampled) as otel:
        name = modules.write(COUNTING)
        otel.install(f"{name}.*")
        mod = importlib.import_module(name)
        received = run_on(loop_factory, consume(mod))
        gc.collect()
        yields = sum(p.value for p in otel.points(_names.ITERATOR_YIELDS.name))
        assert yields == len(received) > 0
        # The first request and then one in TIMING_STRIDE are timed.
        timed = sum(p.count for p in otel.points(_names.ITERATOR_NEXT_DURATION.name))
        assert 1 <= timed <= 1 + len(received) // _proxies.TIMING_STRIDE + 1


SLOW_CONSUMER = '''
async def quick(n):
    for i in range(n):
        yield i
'''


@pytest.mark.parametrize("sampled", [True, False], ids=["traced", "metrics-only"])
def test_next_duration_times_one_request_not_the_consumer(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], modules: Modules, sampled: bool,
) -> None:
    """A timed request is the generator's time to produce one item: the consumer's work
    between the timed item and the next is not in it (it used to take 32 items' worth)."""
    with otel_for(sampled=sampled) as otel:
        name = modules.write(SLOW_CONSUMER)
        otel.install(f"{name}:quick")
        mod = importlib.import_module(name)

        async def main() -> int:
            count = 0
            async for _ in mod.quick(70):
                time.sleep(0.002)  # the consumer's work per item
                count += 1
            return count

        assert run_on(loop_factory, main()) == 70
        gc.collect()
        (point,) = otel.points(_names.ITERATOR_NEXT_DURATION.name)
        assert point.count == 3  # requests 1, 33 and 65
        assert point.max < 0.002, point.max
