"""Helpers shared by the test modules (importable as ``_support``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_on(
    factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, T]
) -> T:
    """Run ``coro`` to completion on a fresh loop from ``factory``, like ``asyncio.run``."""
    loop = factory()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def use_python_hot_paths(monkeypatch: Any) -> None:
    """Instrument with the Python references of the C extension's hot paths, as where it is not
    built (``_proxies.python_hot_paths``: ``make_cm_methods``' functions, the sorting fold,
    ``_open_span``..., ``_CountedRequests``)."""
    from asyncdiag import _proxies

    for owner, name, value in _proxies.python_hot_paths():
        monkeypatch.setattr(owner, name, value)


def assert_c_hot_paths() -> None:
    """The C extension's hot paths are the ones in use (see ``use_python_hot_paths``)."""
    from asyncdiag import _proxies, _speedups, _telemetry

    assert _proxies._MeasuredDunder is _speedups.MeasuredDunder
    assert _telemetry._fold_into is _speedups.fold_into
    assert type(vars(_proxies.AsyncCMProxy)["__aenter__"]) is _speedups.MeasuredDunder
    assert _proxies._BlockOps is _speedups.BlockOps
    assert _proxies._COUNTED is _proxies._Counted
    assert _proxies._CountedBase is _speedups.CountedBase
