"""asyncdiag: finds the classic asyncio mistakes in running services and streams async
resource behaviour to OpenTelemetry.

    import asyncdiag
    asyncdiag.install()

The public API is this module's ``__all__``; everything in underscore modules is private.

PYTEST_DONT_REWRITE: the package ships a pytest plugin, so pytest would mark it for assertion
rewriting and warn "Module already imported so cannot be rewritten" in every test run started
with ASYNCDIAG_ENABLED=1 (the agent imports the package at interpreter start-up). It has no
assertions to rewrite.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ._findings import Finding
from ._lifecycle import Agent, InstallError, install, uninstall

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "Finding",
    "InstallError",
    "__version__",
    "findings",
    "install",
    "instrument",
    "uninstall",
]

T = TypeVar("T")


def findings() -> list[Finding]:
    """Every finding so far, folded by kind and location, oldest first.

    Called outside a running event loop, it first lets the loop watchdog finish judging a
    step it was still timing (at most a few tens of milliseconds), so that a slow step that
    ended just before, e.g. the last one of an ``asyncio.run``, is included."""
    import asyncio
    import sys

    from ._findings import STORE

    watchdog_module = sys.modules.get("asyncdiag._watchdog")
    watchdog = getattr(watchdog_module, "_MONITOR", None)
    if watchdog is not None and asyncio._get_running_loop() is None:
        watchdog.settle()
    return STORE.snapshot()


def instrument(target: T) -> T:
    """Explicitly instrument one class (async context manager or iterator), async generator
    function, or ``@asynccontextmanager`` function. Works before or after ``install()``;
    without an installed agent the object behaves exactly as undecorated."""
    from ._instrumentation import instrument as _instrument

    return _instrument(target)


def __getattr__(name: str) -> Any:
    raise AttributeError(f"module 'asyncdiag' has no attribute {name!r}")
