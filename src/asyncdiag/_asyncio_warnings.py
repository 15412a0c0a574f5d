"""asyncio's own warnings and debug reports, turned into findings with locations.

* ``never_awaited``: CPython calls ``warnings._warn_unawaited_coroutine(coro)`` when a
  coroutine that never started is finalized. We wrap that function (restored on stop) and
  report before handing over to it, so the RuntimeWarning still goes through the warning
  filters exactly as before (``-W error``, pytest's capture). The location is where the
  coroutine was created when origin tracking is on (debug mode), else the line that was running
  when it was dropped, which for the common ``fetch()`` without ``await`` is that very line.
* ``unretrieved_exception`` and ``pending_task_destroyed``: asyncio reports them through the
  loop's exception handler. Each monitored loop gets a wrapper that chains to the handler the
  application set (or to ``default_exception_handler``); an application that sets its own
  handler later is wrapped again on the next check. Decision: asyncio's behaviour is kept
  as is (the application's handler, or the default ERROR log with the traceback, still runs),
  because log pipelines alert on those lines; the finding adds the location and the folding.
* In debug mode asyncio (and uvloop) logs ``Executing <handle> took N seconds`` for slow steps.
  That line is replaced by our ``slow_callback`` finding (not duplicated): its exact duration is
  handed to the watchdog, whose finding adds the blocking line; a step the watchdog did not see
  is reported on its own.

Everything here may run on the loop thread or in a finalizer, so it does no file I/O (stacks
are formatted without source lines) and never raises.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any

from . import _findings, _names, _safety
from ._frames import program_frame
from ._patching import Patcher

logger = logging.getLogger("asyncdiag")
_asyncio_logger = logging.getLogger("asyncio")

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]
ExactSink = Callable[[asyncio.AbstractEventLoop | None, float, str], None]

_EXECUTING = re.compile(r"^Executing (.*) took ([0-9.]+) seconds$", re.DOTALL)
# Pieces of asyncio's handle/task reprs that name code, never data: the reprs themselves show
# callback arguments (payloads, credentials) and must not reach a finding.
_CORO_NAME = re.compile(r"coro=<([\w.<>]+)\(")
_CALLBACK_NAME = re.compile(r"^<(?:Timer)?Handle (?:when=\S+ )?([\w.<>]+)\(")
_RUNNING_AT = re.compile(r" (?:running|created|defined) at ([^\s>]+:\d+)")
_HANDLE_AT = re.compile(r"\) at ([^\s>]+:\d+)>?$")


def safe_description(raw: str) -> str:
    """``Task main() running at app.py:12`` from asyncio's repr of a handle, without arguments."""
    coro = _CORO_NAME.search(raw)
    if coro is not None:
        what = f"Task {coro.group(1)}()"
    else:
        callback = _CALLBACK_NAME.search(raw)
        what = f"callback {callback.group(1)}()" if callback is not None else "a callback"
    where = _RUNNING_AT.search(raw) if coro is not None else _HANDLE_AT.search(raw)
    return f"{what} at {where.group(1)}" if where is not None else what


def subject_of(description: str) -> str:
    """``main`` from ``Task main() at app.py:12`` (see :func:`safe_description`)."""
    what = description.split(" at ", 1)[0]
    what = what.split(" ", 1)[-1]
    return what[:-2] if what.endswith("()") else what


def _frame_line(filename: str, lineno: int | None, name: str) -> str:
    return f'  File "{filename}", line {lineno}, in {name}\n'


def _qualname_of(obj: object) -> str:
    name = getattr(obj, "__qualname__", None)
    if isinstance(name, str):
        return name
    return type(obj).__qualname__


def _suspended_frames(coro: object) -> list[FrameType]:
    """The chain of frames where a coroutine (and what it awaits) is suspended, outer first."""
    frames: list[FrameType] = []
    current: object = coro
    for _ in range(100):
        frame = getattr(current, "cr_frame", None) or getattr(current, "gi_frame", None) \
            or getattr(current, "ag_frame", None)
        if frame is None:
            break
        frames.append(frame)
        current = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None) \
            or getattr(current, "ag_await", None)
        if current is None:
            break
    return frames


def _traceback_lines(tb: TracebackType | None) -> tuple[list[str], str | None]:
    lines: list[str] = []
    location: str | None = None
    while tb is not None:
        code = tb.tb_frame.f_code
        lines.append(_frame_line(code.co_filename, tb.tb_lineno, code.co_name))
        location = f"{code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return lines, location


def _source_traceback(context: dict[str, Any]) -> list[str]:
    """asyncio's creation stack (debug mode) as plain lines, no source lookup."""
    source = context.get("source_traceback")
    if not source:
        return []
    lines = ["Created at (most recent call last):\n"]
    for item in source:
        try:
            filename, lineno, name = item.filename, item.lineno, item.name
        except AttributeError:
            continue
        lines.append(_frame_line(filename, lineno, name))
    return lines


class _ChainedHandler:
    """The exception handler we put on a loop: report, then behave exactly as before."""

    __slots__ = ("__weakref__", "inspect", "previous")

    def __init__(self, previous: ExceptionHandler | None,
                 inspect: Callable[[dict[str, Any]], None]) -> None:
        self.previous = previous
        self.inspect = inspect

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.inspect(context)
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


class _DebugLogFilter(logging.Filter):
    """Turns asyncio's "Executing ... took ..." debug-mode line into a slow step record."""

    def __init__(self, sink: ExactSink) -> None:
        super().__init__("asyncdiag")
        self._sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        if _safety.is_disabled("asyncio debug log"):
            return True
        try:
            message = record.getMessage()
            match = _EXECUTING.match(message)
            if match is None:
                return True
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            self._sink(loop, float(match.group(2)), safe_description(match.group(1)))
            return False
        except Exception as exc:
            _safety.hook_failed("asyncio debug log", exc)
            return True


class AsyncioWarnings:
    """The never-awaited hook, the exception-handler chains and the debug-log filter."""

    def __init__(self, exact_sink: ExactSink | None) -> None:
        self._patcher = Patcher()
        self._handlers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _ChainedHandler]
        self._handlers = weakref.WeakKeyDictionary()
        self._filter: _DebugLogFilter | None = None
        self._exact_sink = exact_sink
        self._active = False

    def start(self, debug: bool) -> None:
        self._active = True
        original = getattr(warnings, "_warn_unawaited_coroutine", None)
        if callable(original):
            self._patcher.set(warnings, "_warn_unawaited_coroutine",
                              self._make_unawaited_hook(original))
        if debug and self._exact_sink is not None:
            self._filter = _DebugLogFilter(self._exact_sink)
            _asyncio_logger.addFilter(self._filter)

    def stop(self) -> None:
        self._active = False
        if self._filter is not None:
            _asyncio_logger.removeFilter(self._filter)
            self._filter = None
        self._patcher.restore_all()
        for loop, handler in list(self._handlers.items()):
            try:
                if loop.get_exception_handler() is handler:
                    loop.set_exception_handler(handler.previous)
                else:
                    # Someone set a handler on top of ours; it may still call ours: make it a
                    # pure pass-through.
                    handler.inspect = _ignore
            except Exception:
                logger.debug("asyncdiag: could not restore the handler of %r", loop,
                             exc_info=True)
        self._handlers = weakref.WeakKeyDictionary()

    # -- exception handler chain --------------------------------------------------------------
    def ensure_handler(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wrap the loop's current exception handler unless ours is already outermost."""
        if not self._active or loop.is_closed():
            return
        current = loop.get_exception_handler()
        if isinstance(current, _ChainedHandler):
            return
        handler = _ChainedHandler(current, self._inspect_context)
        loop.set_exception_handler(handler)
        previous = self._handlers.get(loop)
        if previous is not None:
            # The application replaced our wrapper with its own handler, which we now wrap.
            previous.inspect = _ignore
        self._handlers[loop] = handler

    def _inspect_context(self, context: dict[str, Any]) -> None:
        if _safety.is_disabled("asyncio exception handler"):
            return
        try:
            self._report_context(context)
        except Exception as exc:
            _safety.hook_failed("asyncio exception handler", exc)

    @staticmethod
    def _report_context(context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if message == "Task was destroyed but it is pending!":
            task = context.get("task")
            coro = task.get_coro() if isinstance(task, asyncio.Task) else None
            frames = _suspended_frames(coro)
            stack = [_frame_line(f.f_code.co_filename, f.f_lineno, f.f_code.co_name)
                     for f in frames]
            location = None
            where = "suspended"
            if frames:
                inner = frames[-1]
                location = f"{inner.f_code.co_filename}:{inner.f_lineno}"
            else:
                # Collected in a cycle, the coroutine may be finalized before its task: its
                # frame is gone, so point at the coroutine function instead.
                code = getattr(coro, "cr_code", None)
                if code is not None:
                    location = f"{code.co_filename}:{code.co_firstlineno}"
                    where = "defined"
            subject = _qualname_of(coro) if coro is not None else _qualname_of(task)
            task_name = task.get_name() if isinstance(task, asyncio.Task) else None
            _findings.report(
                _names.PENDING_TASK_DESTROYED,
                f"task {subject} was garbage-collected while still pending: "
                f"nothing kept a reference to it, so it never finished ({where} here)",
                subject, location=location, task=task_name,
                stack=stack + _source_traceback(context),
            )
        elif message.endswith("exception was never retrieved"):
            future = context.get("future")
            exc = context.get("exception")
            lines, location = _traceback_lines(getattr(exc, "__traceback__", None))
            name: str | None = None
            if isinstance(future, asyncio.Task):
                name = future.get_name()
                subject = _qualname_of(future.get_coro())
            else:
                subject = _qualname_of(future)
            # The task's name only in the ``task`` field: it may carry request data.
            what = f"task {subject}" if name else subject
            _findings.report(
                _names.UNRETRIEVED_EXCEPTION,
                f"{what} failed with {type(exc).__name__} and nobody retrieved the exception "
                "(no await, .result() or .exception())",
                subject, location=location, task=name,
                # The exception's type, not its message: messages carry payloads and
                # credentials (asyncio's own log line still shows it, as without asyncdiag).
                stack=[*lines, f"{type(exc).__name__}\n", *_source_traceback(context)],
            )

    # -- never awaited --------------------------------------------------------------------------
    def _make_unawaited_hook(self, original: Callable[[Any], None]) -> Callable[[Any], None]:
        def _warn_unawaited_coroutine(coro: Any) -> None:
            if self._active and not _safety.is_disabled("never-awaited hook"):
                try:
                    _report_unawaited(coro, sys._getframe(1))
                except Exception as exc:
                    _safety.hook_failed("never-awaited hook", exc)
            original(coro)

        _warn_unawaited_coroutine.__wrapped__ = original  # type: ignore[attr-defined]
        return _warn_unawaited_coroutine


def _ignore(context: dict[str, Any]) -> None:
    return None


def _report_unawaited(coro: Any, caller: FrameType | None) -> None:
    subject = _qualname_of(coro)
    code = getattr(coro, "cr_code", None)
    defined = f" (defined at {code.co_filename}:{code.co_firstlineno})" if code else ""
    origin: Iterable[tuple[str, int, str]] | None = getattr(coro, "cr_origin", None)
    stack: list[str] = []
    location: str | None
    if origin:
        frames = list(origin)
        location = f"{frames[0][0]}:{frames[0][1]}"
        stack = ["Coroutine created at (most recent call last):\n"] + [
            _frame_line(f, n, name) for f, n, name in reversed(frames)]
        how = "created here"
    else:
        frame = program_frame(caller)
        location = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else None
        how = "dropped here (turn on debug mode to see where it was created)"
    _findings.report(
        _names.NEVER_AWAITED,
        f"coroutine {subject}(){defined} was never awaited; {how}",
        subject, location=location, stack=stack,
    )

