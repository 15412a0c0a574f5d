"""Registry of benchmark sections and variants.

A *section* is one workload pattern (an ``async def`` taking no argument); a *variant* is one
way of running it (plain asyncio, debug mode, asyncdiag installed, ...). ``run.py`` imports
every ``sections_*.py`` and ``variants_*.py`` module next to it; those modules register with
the two decorators below, so engineers add workloads and variants in their own files without
touching the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
SectionBody = Callable[[], Coroutine[Any, Any, None]]
# A variant is a context manager factory: given the loop factory of the run ("asyncio" or
# "uvloop"), it prepares the process (install an agent, set env vars...), yields the factory the
# timed run must use (possibly wrapped, e.g. to turn debug mode on), and undoes everything on
# exit. Only the coroutine run is timed, never the variant's set-up.
VariantFactory = Callable[[LoopFactory], contextlib.AbstractContextManager[LoopFactory]]


@dataclass(frozen=True)
class Section:
    name: str
    body: SectionBody
    description: str = ""


@dataclass(frozen=True)
class Variant:
    name: str
    factory: VariantFactory
    description: str = ""
    order: int = 100


@dataclass
class Registry:
    sections: dict[str, Section] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)


REGISTRY = Registry()


def section(name: str, description: str = "") -> Callable[[SectionBody], SectionBody]:
    """Register ``async def body() -> None`` as a section. Keep one run at roughly 50-300 ms."""

    def decorate(body: SectionBody) -> SectionBody:
        if name in REGISTRY.sections:
            raise ValueError(f"benchmark section {name!r} registered twice")
        REGISTRY.sections[name] = Section(name, body, description or (body.__doc__ or "").strip())
        return body

    return decorate


def variant(
    name: str, description: str = "", order: int = 100
) -> Callable[[VariantFactory], VariantFactory]:
    """Register a variant. A generator function (``contextlib.contextmanager`` style) is
    wrapped here; any other callable must return a context manager. ``order`` sorts the
    table columns (plain first)."""

    def decorate(func: Callable[..., Any]) -> VariantFactory:
        if name in REGISTRY.variants:
            raise ValueError(f"benchmark variant {name!r} registered twice")
        factory: VariantFactory = (
            contextlib.contextmanager(func) if inspect.isgeneratorfunction(func) else func
        )
        REGISTRY.variants[name] = Variant(
            name, factory, description or (func.__doc__ or "").strip(), order
        )
        return factory

    return decorate


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a variant, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
