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
    """asyncio's ``_get_running_loop()`` without ``getpid()`` (3.10/3.11, not Windows)."""

def set_runtime(runtime: Any, /) -> None:
    """The instrumentation's current Runtime (None when off), as ``_proxies.RUNTIME``."""

def fold_into(point: list[float], values: list[float], bounds: tuple[float, ...], /) -> None:
    """Add durations to a histogram point: counts per upper-inclusive bucket, sum, min, max."""

def record_since(series: list[float], t0: float, /) -> float:
    """Append ``perf_counter() - t0`` to a metrics series, folding it when full."""

class Block:
    """An entered traced block (the fields of ``_proxies._Open``)."""

    ctx: Any
    obj: Any
    prev: Any
    probe: Any
    span: Any
    task: Any
    token: Any
    enter_duration: float

class BlockOps:
    """The common case of a traced ``async with`` (see ``_proxies._open_span``)."""

    def __init__(
        self,
        *,
        rt: Any,
        running_loop: Callable[[], Any],
        task_of: Callable[[Any], Any] | dict[Any, Any],
        current_context: Callable[[], Any],
        attach: Callable[[Any], Any],
        detach: Callable[[Any], Any],
        start_span: Callable[..., Any],
        set_span_in_context: Callable[[Any, Any], Any],
        set_attributes: Callable[[Any, Any], None],
        direct_types: dict[type, bool],
        opened: dict[Any, Any],
        pending: dict[int, Any],
        unwind: Callable[[Any, Any], None],
        pop_other: Callable[[Any, Any, Any], Any],
        detach_later: Callable[[Any, Any, Any], None],
        keys: tuple[str, str, str, str],
    ) -> None: ...
    def open(self, name: str, obj: Any, /) -> Block | None: ...
    def pop(self, obj: Any, task: Any, /) -> Any: ...
    def close(self, record: Block, subject: str, outcome: str, exit_duration: float,
              task: Any, /) -> None: ...

class CountedBase:
    """The per-item part of ``_proxies._Counted`` (see ``_CountedRequests``)."""

    agen: Any
    left: int

    def __aiter__(self) -> CountedBase: ...
    def __anext__(self) -> Any: ...
    def asend(self, value: Any, /) -> Any: ...

class MeasuredDunder:
    """An instrumented ``__aenter__``/``__aexit__``, standing for the Python function
    ``reference`` (see ``_proxies.make_cm_methods``); every other attribute is that
    function's."""

    reference: Callable[..., Any]
    active: bool

    def __init__(
        self,
        reference: Callable[..., Any],
        call: Callable[..., Any],
        site: Any,
        owner: type | None,
        is_exit: bool,
        check_cancel: bool,
        helpers: tuple[Any, ...],
        pair: list[Any],
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, obj: Any, owner: type | None = None) -> Any: ...

class MeasuredAwait:
    """What a ``MeasuredDunder`` call returns: the original's coroutine, measured."""

    def __await__(self) -> Any: ...
    def __next__(self) -> Any: ...
    def send(self, value: Any, /) -> Any: ...
    def throw(self, *args: Any) -> Any: ...
    def close(self) -> Any: ...
