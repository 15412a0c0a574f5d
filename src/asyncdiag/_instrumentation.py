"""PLACEHOLDER: implemented by its own issue."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

T = TypeVar("T")

if TYPE_CHECKING:
    from ._lifecycle import Agent


class Instrumentation:
    name = "instrumentation"

    def start(self, agent: Agent) -> None:
        pass

    def stop(self) -> None:
        pass


def instrument(target: T) -> T:
    return target
