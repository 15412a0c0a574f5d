"""install()/uninstall(): idempotence, full restore, rollback, loop settings on every loop."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Any

import pytest

import asyncdiag
from _support import run_on
from asyncdiag import _lifecycle, _safety
from conftest import interpreter_state


async def loop_settings() -> tuple[bool, float]:
    loop = asyncio.get_running_loop()
    return loop.get_debug(), loop.slow_callback_duration


def test_install_is_idempotent() -> None:
    first = asyncdiag.install(exporter="none")
    assert asyncdiag.install(exporter="none") is first
    assert asyncdiag.install() is first or first.config.exporter != "none"
    assert _lifecycle.current() is first


def test_second_install_with_other_config_warns_and_keeps_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = asyncdiag.install(slow_callback_duration=0.2, exporter="none")
    with caplog.at_level(logging.WARNING, logger="asyncdiag"):
        second = asyncdiag.install(slow_callback_duration=0.3, debug=True, exporter="none")
    assert second is first
    assert first.config.slow_callback_duration == 0.2
    warnings = [r.getMessage() for r in caplog.records if "different configuration" in
                r.getMessage()]
    assert len(warnings) == 1
    assert "debug" in warnings[0] and "slow_callback_duration" in warnings[0]


def test_uninstall_without_install_is_harmless() -> None:
    asyncdiag.uninstall()
    asyncdiag.uninstall()
    assert _lifecycle.current() is None


def test_uninstall_restores_interpreter_state() -> None:
    before = interpreter_state()
    asyncdiag.install(debug=True, slow_callback_duration=0.05, exporter="none")
    during = interpreter_state()
    assert during != before, "install() should have changed something observable"
    asyncdiag.uninstall()
    assert interpreter_state() == before


def test_reinstall_after_uninstall_works() -> None:
    for _ in range(3):
        asyncdiag.install(debug=True, exporter="none")
        assert asyncio.run(loop_settings())[0] is True
        asyncdiag.uninstall()
        assert asyncio.run(loop_settings())[0] is False


class _Exploding:
    name = "exploding"

    def start(self, agent: _lifecycle.Agent) -> None:
        raise RuntimeError("boom")

    def stop(self) -> None:
        pass


def test_failed_install_rolls_back_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    before = interpreter_state()
    real_build = _lifecycle.Agent._build

    def build_then_explode(self: _lifecycle.Agent) -> None:
        real_build(self)
        self._components.append(_Exploding())

    monkeypatch.setattr(_lifecycle.Agent, "_build", build_then_explode)
    with pytest.raises(asyncdiag.InstallError, match="exploding"):
        asyncdiag.install(debug=True, exporter="none")
    assert _lifecycle.current() is None
    assert interpreter_state() == before
    assert asyncio.run(loop_settings()) == (False, 0.1)
    monkeypatch.undo()
    asyncdiag.install(exporter="none")  # and a later install still works
    assert _lifecycle.current() is not None


def test_debug_and_threshold_on_every_kind_of_loop() -> None:
    asyncdiag.install(debug=True, slow_callback_duration=0.25, exporter="none")
    expected = (True, 0.25)
    assert asyncio.run(loop_settings()) == expected
    assert run_on(asyncio.new_event_loop, loop_settings()) == expected
    # A loop constructed directly, bypassing the policy, is found when it starts running.
    assert run_on(asyncio.SelectorEventLoop, loop_settings()) == expected
    if sys.version_info >= (3, 11):
        with asyncio.Runner() as runner:
            assert runner.run(loop_settings()) == expected
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            assert runner.run(loop_settings()) == expected
    # asyncio.run(debug=False) asked explicitly: the agent was asked for debug everywhere.
    assert asyncio.run(loop_settings(), debug=False) == expected


def test_debug_and_threshold_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    asyncdiag.install(debug=True, slow_callback_duration=0.25, exporter="none")
    expected = (True, 0.25)
    assert run_on(uvloop.new_event_loop, loop_settings()) == expected
    assert uvloop.run(loop_settings()) == expected
    asyncdiag.uninstall()
    assert uvloop.run(loop_settings()) == (False, 0.1)


def test_uvloop_imported_after_install_is_covered() -> None:
    # uvloop may already be imported by an earlier test; the post-import hook path is then
    # exercised by a fresh interpreter in test_activation.py. Here: both orders behave.
    asyncdiag.install(slow_callback_duration=0.3, exporter="none")
    uvloop = pytest.importorskip("uvloop")
    assert run_on(uvloop.new_event_loop, loop_settings())[1] == 0.3


def test_loop_running_at_install_time_is_configured_and_restored() -> None:
    async def main() -> list[tuple[bool, float]]:
        seen = [await loop_settings()]
        asyncdiag.install(debug=True, slow_callback_duration=0.5, exporter="none")
        seen.append(await loop_settings())
        asyncdiag.uninstall()  # restored on a loop that is still running
        seen.append(await loop_settings())
        return seen

    assert asyncio.run(main()) == [(False, 0.1), (True, 0.5), (False, 0.1)]


def test_loops_in_other_threads_are_configured() -> None:
    asyncdiag.install(slow_callback_duration=0.07, exporter="none")
    results: list[tuple[bool, float]] = []
    threads = [
        threading.Thread(target=lambda: results.append(asyncio.run(loop_settings())))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [(False, 0.07)] * 3


def test_registry_holds_loops_weakly() -> None:
    import gc
    import weakref

    agent = asyncdiag.install(exporter="none")
    loop = asyncio.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0))
    assert loop in agent.loops.loops()
    ref = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert ref() is None


def test_failing_loop_subscriber_is_disabled_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = asyncdiag.install(exporter="none")
    calls: list[Any] = []

    def broken(loop: asyncio.AbstractEventLoop) -> None:
        calls.append(loop)
        raise ValueError("bug in a detector")

    agent.loops.subscribe(on_loop=broken)
    with caplog.at_level(logging.ERROR, logger="asyncdiag"):
        for _ in range(3):
            assert asyncio.run(loop_settings()) == (False, 0.1)  # the host is unaffected
    assert len(calls) == 1  # disabled after the first failure
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "internal error" in errors[0].getMessage()
    assert errors[0].exc_info is not None


def test_guard_returns_default_and_disables() -> None:
    calls = []

    @_safety.guard("test hook", default=-1)
    def hook(x: int) -> int:
        calls.append(x)
        raise KeyError(x)

    assert hook(1) == -1
    assert hook(2) == -1
    assert calls == [1]
    _safety.reset()
    assert hook(3) == -1
    assert calls == [1, 3]
    _safety.reset()



def test_each_run_is_announced_once() -> None:
    agent = asyncdiag.install(exporter="none")
    runs: list[asyncio.AbstractEventLoop] = []
    agent.loops.subscribe(on_run=runs.append)
    # Discovered by the policy and the Runner, then run_forever: one announcement per run, and
    # asyncio.run runs the loop three times (main, shutdown_asyncgens, default executor).
    asyncio.run(asyncio.sleep(0))
    assert len(runs) == 3
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert runs.count(loop) == 2  # one announcement per run, not per discovery path


def test_uvloop_from_a_factory_captured_before_install_is_found() -> None:
    """No creation hook sees a loop made through a reference taken before install() and never
    set as the current loop; its run_forever setting the asyncgen hooks does."""
    uvloop = pytest.importorskip("uvloop")
    factory = uvloop.new_event_loop  # captured before install, like a loop_factory default
    asyncdiag.install(debug=True, slow_callback_duration=0.2, exporter="none")
    loop = factory()
    try:
        assert loop.run_until_complete(loop_settings()) == (True, 0.2)
    finally:
        loop.close()
