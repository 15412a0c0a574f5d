"""PLACEHOLDER: implemented by its own issue."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._lifecycle import Agent


class LoopMonitor:
    name = "loop monitor"

    def start(self, agent: Agent) -> None:
        pass

    def stop(self) -> None:
        pass
