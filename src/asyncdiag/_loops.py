"""Finding every event loop, and applying the loop settings to each.

There is no single place where loops are born: ``asyncio.new_event_loop`` goes through the
policy, ``asyncio.Runner``/``asyncio.run`` (3.11+) may take a ``loop_factory`` (``uvloop.run``
does), code may construct ``SelectorEventLoop()`` directly, and a loop may already be running
when the agent is installed. So the registry watches several places, all patched with wrapt and
restored on stop:

* ``BaseDefaultEventLoopPolicy.new_event_loop`` and ``.set_event_loop``;
* ``asyncio.Runner._lazy_init`` (3.11+), which sees loops from any ``loop_factory``;
* ``BaseEventLoop.run_forever``, which sees every asyncio loop each time it starts running;
* ``uvloop.new_event_loop`` (when uvloop is imported, before or after install);
* the loop running in the installing thread, if any.

Each discovered loop gets the configured ``debug`` and ``slow_callback_duration`` (originals
kept and restored on stop, also on loops still running) and is announced to subscribers. The
registry holds loops weakly: it never keeps a loop alive.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.events
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import wrapt

from . import _safety
from ._patching import Patcher

if TYPE_CHECKING:
    from ._lifecycle import Agent

logger = logging.getLogger("asyncdiag")

LoopCallback = Callable[[asyncio.AbstractEventLoop], None]


def _running_tasks_table() -> dict[Any, Any] | None:
    """asyncio's ``{loop: running task}`` dict, which ``current_task()`` reads up to 3.13
    (3.14 keeps the running task in the thread state), or None."""
    table = getattr(asyncio.tasks, "_current_tasks", None)
    if not isinstance(table, dict) or sys.version_info >= (3, 14):
        return None
    return table


def _task_lookup(table: dict[Any, Any] | None) -> Callable[[Any], Any]:
    """The cheapest ``loop -> current task``: ``asyncio.current_task`` is a Python function on
    3.10/3.11 (a frame per call on hot paths), where the table is read directly."""
    c_current = getattr(sys.modules.get("_asyncio"), "current_task", None)
    if c_current is not None and asyncio.current_task is c_current:
        return c_current  # type: ignore[no-any-return]
    if table is not None:
        return table.get
    return asyncio.current_task


def _running_loop_lookup() -> Callable[[], Any]:
    """The cheapest ``asyncio._get_running_loop``. On 3.10/3.11 asyncio's makes a ``getpid()``
    system call per call (its fork check: about 200 ns of the 250 ns it costs here, against
    60 ns on 3.13); the C extension's ``running_loop`` reads the same state and checks the pid
    against one refreshed at fork. It is used only where asyncio's function is the C
    accelerator's (which keeps that state), and only if both answer alike outside a loop."""
    asyncio_lookup: Callable[[], Any] = asyncio.events._get_running_loop
    accelerator: object = getattr(sys.modules.get("_asyncio"), "_get_running_loop", None)
    try:
        from ._speedups import running_loop
    except ImportError:
        return asyncio_lookup
    if accelerator is None or asyncio_lookup is not accelerator:
        return asyncio_lookup
    try:
        agrees = running_loop() is asyncio_lookup()
    except Exception:
        return asyncio_lookup
    return running_loop if agrees else asyncio_lookup


RUNNING_TASKS = _running_tasks_table()
task_of = _task_lookup(RUNNING_TASKS)
# What the C extension takes to find the running task: asyncio's table, which it reads
# without a call, where there is one; else the lookup above.
TASK_SOURCE: Callable[[Any], Any] | dict[Any, Any] = (
    RUNNING_TASKS if RUNNING_TASKS is not None else task_of
)
running_loop = _running_loop_lookup()


class LoopRegistry:
    name = "loops"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._patcher = Patcher()
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._originals: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[bool, float]]
        self._originals = weakref.WeakKeyDictionary()
        # Loops with an announcement queued and not yet run: Runner discovery and the
        # run_forever that follows would otherwise announce the same run twice.
        self._announce_queued: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._on_loop: list[LoopCallback] = []
        self._on_run: list[LoopCallback] = []
        self._debug: bool = False
        self._slow_callback_duration: float = 0.1
        self._active = False
        self._uvloop_hook_registered = False
        self.seen_any = False

    # -- public to the other components ------------------------------------------------
    def subscribe(
        self, on_loop: LoopCallback | None = None, on_run: LoopCallback | None = None
    ) -> None:
        """``on_loop(loop)`` once per discovered loop (also for loops already known), from
        whichever thread discovered it; ``on_run(loop)`` inside the loop's own thread, each
        time an asyncio loop starts running and once for other loops."""
        with self._lock:
            if on_loop is not None:
                self._on_loop.append(on_loop)
            if on_run is not None:
                self._on_run.append(on_run)
            known = list(self._loops)
        if on_loop is not None:
            for loop in known:
                self._call(on_loop, loop)

    def unsubscribe(
        self, on_loop: LoopCallback | None = None, on_run: LoopCallback | None = None
    ) -> None:
        with self._lock:
            if on_loop in self._on_loop:
                self._on_loop.remove(on_loop)
            if on_run in self._on_run:
                self._on_run.remove(on_run)

    def loops(self) -> list[asyncio.AbstractEventLoop]:
        with self._lock:
            return [loop for loop in self._loops if not loop.is_closed()]

    def discover(self, loop: object) -> None:
        """Register ``loop`` if it is new. Cheap when it is already known."""
        if not self._active or not isinstance(loop, asyncio.AbstractEventLoop):
            return
        if loop in self._loops:
            return
        with self._lock:
            if loop in self._loops:
                return
            try:
                self._loops.add(loop)
            except TypeError:  # a loop type without weakref support: never hold it strongly
                logger.warning("asyncdiag: cannot monitor %r (no weak references)", loop)
                return
            self.seen_any = True
            self._apply_settings(loop)
            subscribers = list(self._on_loop)
        for callback in subscribers:
            self._call(callback, loop)
        if not loop.is_closed():
            # Runs inside the loop's thread on its first iteration, after run_forever has
            # installed its own asyncgen hooks and after a Runner's set_debug(...).
            self._queue_announcement(loop)

    # -- component ----------------------------------------------------------------------
    def start(self, agent: Agent) -> None:
        self._debug = agent.config.debug
        self._slow_callback_duration = agent.config.slow_callback_duration
        self._active = True
        policy_cls = asyncio.events.BaseDefaultEventLoopPolicy
        self._wrap(policy_cls, "new_event_loop", self._after_call_discover_result)
        self._wrap(policy_cls, "set_event_loop", self._before_call_discover_arg)
        self._wrap(asyncio.base_events.BaseEventLoop, "run_forever", self._wrap_run_forever)
        runners = sys.modules.get("asyncio.runners")
        runner_cls = getattr(runners, "Runner", None)
        if runner_cls is not None and hasattr(runner_cls, "_lazy_init"):
            self._wrap(runner_cls, "_lazy_init", self._wrap_lazy_init)
        if "uvloop" in sys.modules:
            self._patch_uvloop(sys.modules["uvloop"])
        elif not self._uvloop_hook_registered:
            # wrapt keeps post-import hooks forever; the hook checks _active so it is inert
            # after stop, and it is registered once per registry.
            wrapt.register_post_import_hook(self._patch_uvloop_if_active, "uvloop")
            self._uvloop_hook_registered = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:
            self.discover(running)

    def stop(self) -> None:
        with self._lock:
            self._active = False
            self._patcher.restore_all()
            for loop, (debug, slow) in list(self._originals.items()):
                try:
                    loop.set_debug(debug)
                    loop.slow_callback_duration = slow
                except Exception:
                    logger.debug("asyncdiag: could not restore settings of %r", loop,
                                 exc_info=True)
            self._originals.clear()
            self._loops = weakref.WeakSet()
            self._announce_queued = weakref.WeakSet()
            self._on_loop.clear()
            self._on_run.clear()

    # -- internals ----------------------------------------------------------------------
    def _apply_settings(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if loop not in self._originals:
                self._originals[loop] = (loop.get_debug(), float(loop.slow_callback_duration))
            if self._debug:
                loop.set_debug(True)
            loop.slow_callback_duration = self._slow_callback_duration
        except Exception as exc:
            _safety.hook_failed("loop settings", exc)

    def _queue_announcement(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if loop in self._announce_queued:
                return
            self._announce_queued.add(loop)
        try:
            loop.call_soon(self._announce_run, loop)
        except RuntimeError:  # closed in between
            self._announce_queued.discard(loop)

    def _announce_run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._announce_queued.discard(loop)
        if not self._active:
            return
        # A Runner(debug=False) or asyncio.run(debug=False) overrides creation-time settings.
        self._apply_settings(loop)
        with self._lock:
            subscribers = list(self._on_run)
        for callback in subscribers:
            self._call(callback, loop)

    @staticmethod
    def _call(callback: LoopCallback, loop: asyncio.AbstractEventLoop) -> None:
        name = f"loop subscriber {getattr(callback, '__qualname__', callback)!s}"
        _safety.call_safely(name, callback, loop)

    def _wrap(self, owner: Any, attribute: str, wrapper: Callable[..., Any]) -> None:
        original = getattr(owner, attribute)
        self._patcher.set(owner, attribute, wrapt.FunctionWrapper(original, wrapper))

    def _after_call_discover_result(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        loop = wrapped(*args, **kwargs)
        self._safe_discover(loop)
        return loop

    def _before_call_discover_arg(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        loop = args[0] if args else kwargs.get("loop")
        if loop is not None:
            self._safe_discover(loop)
        return wrapped(*args, **kwargs)

    def _wrap_run_forever(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        if self._active and instance is not None:
            try:
                if instance in self._loops:
                    self._queue_announcement(instance)
                else:
                    self.discover(instance)
            except Exception as exc:
                _safety.hook_failed("loop discovery", exc)
        return wrapped(*args, **kwargs)

    def _wrap_lazy_init(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        result = wrapped(*args, **kwargs)
        self._safe_discover(getattr(instance, "_loop", None))
        return result

    def _safe_discover(self, loop: object) -> None:
        if loop is None or _safety.is_disabled("loop discovery"):
            return
        try:
            self.discover(loop)
        except Exception as exc:
            _safety.hook_failed("loop discovery", exc)

    def _patch_uvloop_if_active(self, module: Any) -> None:
        if self._active:
            self._patch_uvloop(module)

    def _patch_uvloop(self, module: Any) -> None:
        try:
            if hasattr(module, "new_event_loop"):
                self._wrap(module, "new_event_loop", self._after_call_discover_result)
        except Exception as exc:
            _safety.hook_failed("uvloop discovery", exc)
