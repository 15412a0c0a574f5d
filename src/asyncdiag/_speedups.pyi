# Types of the optional C extension built from _speedups.c.
from collections.abc import Callable
from typing import Any

class FirstIterHook:
    """The asyncgen tracker's firstiter hook under a loop's own hooks."""

    _asyncdiag_chain: Any

    def __init__(
        self,
        first: Callable[[Any], object],
        tracker: Any,
        registry: dict[int, Any],
        skip_cache: dict[str, bool],
        chain: Any,
        loop: Any,
        current_task: Callable[[Any], Any] | dict[Any, Any],
    ) -> None: ...
    def __call__(self, agen: Any, /) -> None: ...

def running_loop() -> Any:
    """asyncio's ``_get_running_loop()`` without a ``getpid()`` call (built on 3.10/3.11 only)."""

def record_since(series: list[float], t0: float, /) -> float:
    """Append ``perf_counter() - t0`` to a metrics series, folding it when full."""
