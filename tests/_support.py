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
    built: ``make_cm_methods``' functions themselves on the class (not ``MeasuredDunder``),
    the sorting fold of durations (not ``fold_into``), ``_open_span``... for traced blocks
    (not ``BlockOps``), ``_CountedRequests`` (and on 3.10/3.11 the delegating generator) for
    generator requests."""
    import sys

    from asyncdiag import _proxies, _telemetry

    monkeypatch.setattr(_proxies, "_MeasuredDunder", None)
    monkeypatch.setattr(_telemetry, "_fold_into", _telemetry._fold_into_python)
    monkeypatch.setattr(_proxies, "_BlockOps", None)
    monkeypatch.setattr(_proxies, "_COUNTED", _proxies._CountedPython)
    monkeypatch.setattr(_proxies, "_COUNT_BY_CALL", sys.version_info >= (3, 12))
    # AsyncCMProxy's pair was made at import: put the Python functions they stand for there.
    for name in ("__aenter__", "__aexit__"):
        method = vars(_proxies.AsyncCMProxy)[name]
        monkeypatch.setattr(_proxies.AsyncCMProxy, name, getattr(method, "reference", method))


def assert_c_hot_paths() -> None:
    """The C extension's hot paths are the ones in use (see ``use_python_hot_paths``)."""
    from asyncdiag import _proxies, _speedups, _telemetry

    assert _proxies._MeasuredDunder is _speedups.MeasuredDunder
    assert _telemetry._fold_into is _speedups.fold_into
    assert type(vars(_proxies.AsyncCMProxy)["__aenter__"]) is _speedups.MeasuredDunder
    assert _proxies._BlockOps is _speedups.BlockOps
    assert _proxies._COUNTED is _proxies._Counted
    assert _proxies._CountedBase is _speedups.CountedBase
