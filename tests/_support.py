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
