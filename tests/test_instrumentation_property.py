"""Transparency as a property: random ``async with`` / ``async for`` programs (bodies that
return, raise, get cancelled from inside or outside, break early; context managers and
generators that await, raise, suppress) run on a plain copy of a module and on an
instrumented copy, on asyncio and uvloop. Values, the exception that comes out (the very
object, its traceback's frames), cancellation and the order of every side effect must match.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncdiag
from _support import run_on, use_python_hot_paths
from asyncdiag import _findings, _telemetry

SOURCE = '''
import asyncio


class CM:
    def __init__(self, plan, log):
        self.plan, self.log = plan, log

    async def __aenter__(self):
        self.log.append("enter")
        for _ in range(self.plan["enter_awaits"]):
            await asyncio.sleep(0)
        if self.plan["enter_raises"]:
            raise self.plan["enter_exc"]
        return self.plan["value"]

    async def __aexit__(self, exc_type, exc, tb):
        self.log.append(("exit", exc_type.__name__ if exc_type else None,
                         exc is not None and exc is self.plan["body_exc"]))
        try:
            for _ in range(self.plan["exit_awaits"]):
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.log.append("exit saw cancel")
            if not self.plan["exit_swallows_cancel"]:
                raise
        if self.plan["exit_raises"]:
            raise self.plan["exit_exc"]
        return self.plan["suppress"]


class Ticker:
    def __init__(self, plan, log):
        self.plan, self.log, self.i = plan, log, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.i >= self.plan["n"]:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        self.i += 1
        return -self.i


async def gen(plan, log):
    try:
        for i in range(plan["n"]):
            for _ in range(plan["gen_awaits"]):
                await asyncio.sleep(0)
            if i == plan["gen_raise_at"]:
                raise plan["gen_exc"]
            sent = yield i
            if sent is not None:
                log.append(("sent", sent))
    except GeneratorExit:
        log.append("gen closed")
        raise
    finally:
        log.append("gen finally")
'''

plans = st.fixed_dictionaries({
    "value": st.sampled_from([None, 0, "v", (1, 2)]),
    "enter_awaits": st.integers(0, 2),
    "enter_raises": st.booleans(),
    "exit_awaits": st.integers(0, 3),
    "exit_raises": st.booleans(),
    "exit_swallows_cancel": st.booleans(),
    "suppress": st.sampled_from([None, False, True, 1]),
    # 40: past TIMING_STRIDE, so untimed requests and a second timed one are in play.
    "n": st.sampled_from([0, 1, 2, 3, 4, 5, 40]),
    "gen_awaits": st.integers(0, 2),
    "gen_raise_at": st.sampled_from([None, 0, 2, 35]),
    "break_at": st.sampled_from([None, 0, 1, 3, 34]),
    "aclose_after_break": st.booleans(),
    "use_asend": st.booleans(),
    "use_ticker": st.booleans(),
    "body": st.sampled_from(["return", "raise", "cancel_self", "await"]),
    "outside_cancel_after": st.sampled_from([None, 0, 1, 3, 6]),
})


ASYNCDIAG_DIR = str(Path(asyncdiag.__file__).parent)


def frame_names(exc: BaseException) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """(the caller's frames, the library module's frames, asyncdiag's frames)."""
    frames = traceback.extract_tb(exc.__traceback__)
    callers = tuple(f.name for f in frames if f.name in ("scenario", "inner"))
    ours = sum(f.filename.startswith(ASYNCDIAG_DIR) for f in frames)
    module = tuple(f.name for f in frames
                   if f.name not in ("scenario", "inner")
                   and not f.filename.startswith(ASYNCDIAG_DIR))
    return callers, module, ours


def is_subsequence(short: tuple[str, ...], long: tuple[str, ...]) -> bool:
    it = iter(long)
    return all(name in it for name in short)


def assert_same(got: tuple[Any, list[Any]], expected: tuple[Any, list[Any]]) -> None:
    (got_outcome, got_log), (exp_outcome, exp_log) = got, expected
    assert got_log == exp_log
    if got_outcome[0] != "raised" or exp_outcome[0] != "raised":
        assert got_outcome == exp_outcome
        return
    assert got_outcome[:3] == exp_outcome[:3]  # same type, the very same object
    (g_callers, g_module, g_ours), (e_callers, e_module, _) = got_outcome[3], exp_outcome[3]
    assert g_callers == e_callers
    if sys.version_info >= (3, 11):
        assert g_ours == 0  # our frames are cut from tracebacks (3.10 keeps one, documented)
    # The library's own frames are all there. CPython leaves out the frame of an __aexit__
    # that raised after a CancelledError was thrown into it while the body's exception was
    # in flight (the with-statement resumes it directly); behind our wrapper it appears, so
    # the instrumented traceback may show one more frame of the library, never fewer.
    assert is_subsequence(e_module, g_module), (e_module, g_module)


async def scenario(mod: Any, raw_plan: dict[str, Any]) -> tuple[Any, list[Any]]:
    log: list[Any] = []
    plan = dict(raw_plan, body_exc=ValueError("body"), enter_exc=KeyError("enter"),
                exit_exc=LookupError("exit"), gen_exc=RuntimeError("gen"))
    ours = {id(plan[k]): k for k in ("body_exc", "enter_exc", "exit_exc", "gen_exc")}

    async def inner() -> list[int]:
        items: list[int] = []
        async with mod.CM(plan, log) as value:
            log.append(("value", value))
            source = mod.Ticker(plan, log) if plan["use_ticker"] else mod.gen(plan, log)
            if plan["use_asend"] and not plan["use_ticker"]:
                try:
                    items.append(await source.asend(None))
                    items.append(await source.asend("x"))
                except StopAsyncIteration:
                    log.append("stopped")
            async for i in source:
                items.append(i)
                if plan["break_at"] == i:
                    if plan["aclose_after_break"] and hasattr(source, "aclose"):
                        await source.aclose()
                    break
                await asyncio.sleep(0)
            del source
            if plan["body"] == "raise":
                raise plan["body_exc"]
            if plan["body"] == "cancel_self":
                asyncio.current_task().cancel()  # type: ignore[union-attr]
                await asyncio.sleep(0)
            if plan["body"] == "await":
                await asyncio.sleep(0)
        log.append("after block")
        return items

    task = asyncio.ensure_future(inner())
    if plan["outside_cancel_after"] is not None:
        for _ in range(plan["outside_cancel_after"]):
            await asyncio.sleep(0)
        task.cancel()
    try:
        outcome: Any = ("returned", await task)
    except asyncio.CancelledError as exc:
        outcome = ("cancelled", task.cancelled(), exc.args)
    except BaseException as exc:
        outcome = ("raised", type(exc).__name__, ours.get(id(exc)), frame_names(exc))
    for _ in range(3):  # let finalizer tasks of abandoned generators run
        await asyncio.sleep(0)
    return outcome, log


@pytest.fixture(scope="module")
def module_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    root: Path = tmp_path_factory.mktemp("property_modules")
    (root / "adx_prop_plain.py").write_text(SOURCE)
    (root / "adx_prop_instr.py").write_text(SOURCE)
    sys.path.insert(0, str(root))
    try:
        plain = importlib.import_module("adx_prop_plain")
        yield plain, "adx_prop_instr"
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("adx_prop_plain", None)
        sys.modules.pop("adx_prop_instr", None)


@pytest.mark.parametrize(
    "mode", ["traced", "traced-python", "metrics-only", "metrics-only-python"])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plans)
def test_instrumented_runs_are_indistinguishable(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], monkeypatch: pytest.MonkeyPatch,
    module_pair: tuple[Any, str], mode: str, plan: dict[str, Any],
) -> None:
    """Without ``-python``, the C extension's hot paths where it is built (``MeasuredDunder``,
    ``BlockOps``, ``CountedBase``); with it, their Python references."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    sampled = mode.startswith("traced")
    if mode.endswith("-python"):
        use_python_hot_paths(monkeypatch)
    plain, instr_name = module_pair
    provider = TracerProvider(sampler=None if sampled else ALWAYS_OFF)
    _telemetry.use_providers(tracer_provider=provider)
    asyncdiag.install(instrument=f"{instr_name}.*", exporter="none")
    try:
        instrumented = importlib.import_module(instr_name)
        assert hasattr(instrumented.CM.__aenter__, "__asyncdiag_instrumented__")
        expected = run_on(loop_factory, scenario(plain, plan))
        got = run_on(loop_factory, scenario(instrumented, plan))
        assert_same(got, expected)
    finally:
        asyncdiag.uninstall()
        provider.shutdown()
        _findings.STORE.clear()
