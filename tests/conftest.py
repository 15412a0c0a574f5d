"""Shared fixtures. The autouse fixture proves that no test leaks agent state into the next:
after each test the agent is uninstalled and the interpreter must be as it was before."""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.events
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import asyncdiag
from asyncdiag import _findings, _lifecycle

pytest_plugins = ["pytester"]


def interpreter_state() -> dict[str, Any]:
    """Everything install() may touch, captured by identity."""
    policy_cls = asyncio.events.BaseDefaultEventLoopPolicy
    state: dict[str, Any] = {
        "asyncgen_hooks": tuple(sys.get_asyncgen_hooks()),
        "policy.new_event_loop": vars(policy_cls).get("new_event_loop"),
        "policy.set_event_loop": vars(policy_cls).get("set_event_loop"),
        "BaseEventLoop": dict(vars(asyncio.base_events.BaseEventLoop)),
        "Handle._run": vars(asyncio.events.Handle).get("_run"),
        "asyncdiag logger handlers": list(logging.getLogger("asyncdiag").handlers),
        "root logger handlers": list(logging.getLogger().handlers),
        "excepthook": sys.excepthook,
        "unraisablehook": sys.unraisablehook,
        "coroutine_origin_tracking_depth": sys.get_coroutine_origin_tracking_depth(),
    }
    runners = sys.modules.get("asyncio.runners")
    runner_cls = getattr(runners, "Runner", None)
    if runner_cls is not None:
        state["Runner"] = dict(vars(runner_cls))
    uvloop = sys.modules.get("uvloop")
    if uvloop is not None:
        state["uvloop.new_event_loop"] = uvloop.new_event_loop
    return state


@pytest.fixture(autouse=True)
def _no_agent_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    _lifecycle.uninstall()
    _findings.STORE.clear()
    before = interpreter_state()
    yield
    asyncdiag.uninstall()
    _findings.STORE.clear()
    after = interpreter_state()
    leaked = [key for key in before if before[key] != after.get(key)]
    if leaked:
        pytest.fail(f"asyncdiag left changes behind after uninstall: {leaked}")


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> Any:
    """A real event loop factory: plain asyncio, or uvloop."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop
    return asyncio.new_event_loop

