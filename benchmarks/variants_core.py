"""The reference variants: plain asyncio, asyncio debug mode, asyncdiag with defaults."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from _registry import LoopFactory, variant


@variant("plain", "no diagnostics (the baseline every ratio is relative to)", order=0)
def plain(factory: LoopFactory) -> Iterator[LoopFactory]:
    yield factory


@variant("debug", "asyncio debug mode (loop.set_debug(True))", order=10)
def debug(factory: LoopFactory) -> Iterator[LoopFactory]:
    def debug_factory() -> asyncio.AbstractEventLoop:
        loop = factory()
        loop.set_debug(True)
        return loop

    # Debug mode logs every step over 100 ms ("Executing ... took"); those lines would bury the
    # table, and silencing them does not change what debug mode measures per step.
    asyncio_logger = logging.getLogger("asyncio")
    level = asyncio_logger.level
    asyncio_logger.setLevel(logging.ERROR)
    try:
        yield debug_factory
    finally:
        asyncio_logger.setLevel(level)


@variant("asyncdiag", "asyncdiag.install() with default settings", order=20)
def asyncdiag_default(factory: LoopFactory) -> Iterator[LoopFactory]:
    import asyncdiag

    asyncdiag.install(exporter="none")
    try:
        yield factory
    finally:
        asyncdiag.uninstall()
