"""Failures inside asyncdiag never reach the host program.

Every hook asyncdiag runs inside the host (loop callbacks, asyncgen hooks, wrapt wrappers,
GC finalizers, watchdog threads) goes through :func:`guard` or :func:`hook_failed`: the first
failure is logged once with its traceback and the hook is disabled; the host sees nothing.
Modelled on trio's instrumentation, where an instrument that raises is removed and logged.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

logger = logging.getLogger("asyncdiag")

P = ParamSpec("P")
R = TypeVar("R")

_lock = threading.Lock()
_disabled: set[str] = set()


def is_disabled(name: str) -> bool:
    return name in _disabled


def hook_failed(name: str, exc: BaseException) -> None:
    """Record that hook ``name`` raised ``exc``: log once, disable it. Never raises."""
    try:
        with _lock:
            first = name not in _disabled
            _disabled.add(name)
        if first:
            logger.error(
                "asyncdiag: internal error in %s; this check is disabled for the rest of the "
                "process (the program itself is not affected)",
                name,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
    except BaseException:
        pass


def call_safely(name: str, func: Callable[..., object], *args: object) -> None:
    """Call a hook; if it raises, log once and skip it from then on (see module doc)."""
    if name in _disabled:
        return
    try:
        func(*args)
    except Exception as exc:
        hook_failed(name, exc)


def guard(name: str, default: R) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a hook so that it returns ``default`` instead of raising, and stays off after."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            if name in _disabled:
                return default
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                hook_failed(name, exc)
                return default

        return guarded

    return decorate


def reset() -> None:
    """Re-enable every hook (used by uninstall, so a fresh install starts clean)."""
    with _lock:
        _disabled.clear()
