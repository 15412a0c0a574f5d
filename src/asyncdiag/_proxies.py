"""The wrappers that measure instrumented async context managers and iterators.

Everything here runs on the host's hot path, so it is written for cost first: no span object
when the sampler would drop it (``_spans``), metrics aggregated in-process by ``Telemetry``,
the caller's line looked up only when a finding is reported or a span records it.

Transparency rules followed throughout:

* the original method's awaitable is awaited exactly once, with the same arguments, and its
  result (or exception object) is handed back unchanged;
* our own frame is removed from the traceback of an exception that passed through it (on
  3.11+, where a bare ``raise`` keeps the edited traceback; 3.10 keeps one extra frame). With
  the C extension the patched ``__aenter__``/``__aexit__`` add no frame at all: they are
  ``_speedups.MeasuredDunder`` objects standing for the functions ``make_cm_methods`` makes,
  which remain the reference and the path of every uncommon case;
* native async generators cannot be patched, so the generator function is wrapped and what it
  returns is a ``wrapt.ObjectProxy`` (``isinstance``/``inspect.isasyncgen`` answer as for the
  generator). ``async for`` over the proxy drives a native delegating generator, so that an
  item costs one generator resumption and a few local-variable stores, not a Python call.
"""

from __future__ import annotations

import asyncio
import contextvars
import dis
import inspect
import sys
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from time import perf_counter
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

import wrapt
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from . import _findings, _loops, _names, _safety, _spans, _telemetry
from ._frames import code_location, program_frame

_CancelledError = asyncio.CancelledError
_get_running_loop = _loops.running_loop
_current_task = asyncio.current_task
_HAS_CANCELLING = sys.version_info >= (3, 11)
_task_of = _loops.task_of
_record_since = _telemetry.record_since
_Block: Any = None
_BlockOps: Any = None
_MeasuredDunder: Any = None
_set_c_runtime: Callable[[Any], None] | None = None
try:
    from ._speedups import Block as _Block
    from ._speedups import BlockOps as _BlockOps
    from ._speedups import MeasuredDunder as _MeasuredDunder
    from ._speedups import set_runtime as _set_c_runtime
except ImportError:  # built without a C compiler: the Python path below does it all
    pass

# One item in this many gets its __anext__ timed (and, on 3.11+, checked for a cancellation
# that went in and did not come out). Every item is counted. A clock read costs about as much
# as the whole per-item budget on the machines we measured, so timing every item is not
# affordable. The items between two timed ones are counted down on a small int (cached by
# the interpreter, so no allocation per item); the total is worked out at the timed ones.
TIMING_STRIDE = 32

# Long-lived streams: the yields counter moves every this many items while they run.
_YIELDS_FLUSH = 4096

# Open (entered, not yet exited) context managers that have a span, and iterations of class
# based iterators: bounded, so that abandoned blocks cannot grow memory without limit.
MAX_OPEN = 10_000

HOOK_NAME = "instrumentation"

# wrapt's stubs make these generic; the wrappers here are deliberately untyped pass-throughs.
_ObjectProxy: Any = wrapt.ObjectProxy
_FunctionWrapper: Any = wrapt.FunctionWrapper


class Site:
    """What an instrumented object is called in telemetry, and (for the runtime that bound
    them last) the metric series its wrappers append to, so that the hot path looks nothing
    up by name."""

    __slots__ = ("enter", "exit_ok", "fast", "for_span", "next", "qualname", "runtime",
                 "subject", "with_span")

    def __init__(self, subject: str, qualname: str, with_span: str, for_span: str) -> None:
        self.subject = subject  # module-qualified: the metrics' asyncdiag.subject
        self.qualname = qualname
        self.with_span = with_span
        self.for_span = for_span
        self.runtime: Runtime | None = None
        # ``runtime`` when it only measures (no spans): the wrappers' common path, one test.
        self.fast: Runtime | None = None
        self.enter: Any = None
        self.exit_ok: Any = None
        self.next: Any = None

    @classmethod
    def of(cls, module: str, qualname: str) -> Site:
        subject = f"{module}.{qualname}" if module else qualname
        return cls(
            subject, qualname,
            _names.async_with_span_name(qualname), _names.async_for_span_name(qualname),
        )

    def __repr__(self) -> str:
        return f"Site({self.subject!r})"


class Runtime:
    """Shared by every wrapper while the agent is installed (``RUNTIME`` is None otherwise)."""

    # Slots: the wrappers read these on every operation.
    __slots__ = ("attach", "blocks", "current_context", "detach", "iterations", "mode",
                 "mode_final", "open", "pending_detach", "slow_teardown", "telemetry", "tracer",
                 "tracing")

    def __init__(self, telemetry: Any, slow_teardown: float) -> None:
        self.telemetry = telemetry
        self.slow_teardown = slow_teardown
        self.tracer = telemetry.tracer
        self.mode, self.mode_final = _spans.evaluate(self.tracer)
        self.tracing = self.mode != _spans.NEVER or not self.mode_final
        self.open: dict[tuple[int, Any], _Open] = {}
        self.pending_detach: dict[int, _Open] = {}
        self.iterations: dict[int, _Iteration] = {}
        self.current_context, self.attach, self.detach = _spans.context_access()
        # The common case of a traced block in C, when the extension is built (see
        # _speedups.c, "Traced blocks"). Spans start as in _open_span: straight from the tracer
        # when the sampler decides each one, else through start_span's pre-check.
        self.blocks: Any = None
        if _BlockOps is not None and self.tracing:
            ask = self.mode == _spans.ASK and self.mode_final
            self.blocks = _BlockOps(
                rt=self, running_loop=_get_running_loop, task_of=_loops.TASK_SOURCE,
                current_context=self.current_context, attach=self.attach, detach=self.detach,
                start_span=self.tracer.start_span if ask else self.start_span,
                set_span_in_context=trace.set_span_in_context,
                set_attributes=_spans.set_attributes, direct_types=_spans.DIRECT_TYPES,
                opened=self.open, pending=self.pending_detach, unwind=_unwind,
                pop_other=_pop_open, detach_later=_detach,
                keys=(_names.ATTR_SUBJECT, _names.ATTR_OUTCOME, "asyncdiag.enter.duration",
                      "asyncdiag.exit.duration"),
            )

    def start_span(self, name: str, attributes: dict[str, Any] | None = None,
                   context: Any = None) -> Any:
        """A span for ``name`` when it would be sampled, else None (nothing to attach)."""
        if not self.mode_final:
            self.mode, self.mode_final = _spans.evaluate(self.tracer)
            self.tracing = self.mode != _spans.NEVER or not self.mode_final
        mode = self.mode
        if mode == _spans.NEVER:
            return None
        if mode == _spans.FOLLOW_PARENT:
            if _spans.parent_sampled() is not True:
                return None
        elif mode == _spans.FOLLOW_PARENT_ROOT_ON and _spans.parent_sampled() is False:
            return None
        return self.tracer.start_span(name, context=context, attributes=attributes)

    def bind(self, site: Site) -> Site:
        """Point ``site`` at this runtime's series (once per site and install)."""
        telemetry = self.telemetry
        site.enter = telemetry.enter_series(site.subject)
        site.exit_ok = telemetry.exit_series(site.subject, "ok")
        site.next = telemetry.next_series(site.subject)
        # Last: a reader that sees this runtime sees its series.
        site.runtime = self
        site.fast = None if self.tracing else self
        return site


RUNTIME: Runtime | None = None


def set_runtime(runtime: Runtime | None) -> None:
    """The one way ``RUNTIME`` changes: the C extension keeps a copy that its wrappers read."""
    global RUNTIME
    RUNTIME = runtime
    if _set_c_runtime is not None:
        _set_c_runtime(runtime)


def failed(exc: BaseException) -> None:
    """An internal error: log once, and stop measuring (wrappers pass through from now on)."""
    set_runtime(None)
    _safety.hook_failed(HOOK_NAME, exc)


def _trim(exc: BaseException, code: CodeType) -> None:
    """Drop our frame from the head of ``exc``'s traceback (see the module docstring)."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code is code:
        exc.__traceback__ = tb.tb_next


def _location(frame: FrameType | None) -> str | None:
    if frame is None:
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _task_name() -> str | None:
    try:
        task = _current_task() if _get_running_loop() is not None else None
    except Exception:
        return None
    return task.get_name() if task is not None else None


def _cancelling() -> tuple[Any, int]:
    """The current task and how many cancellation requests it has pending (3.11+)."""
    loop = _get_running_loop()
    if loop is None:
        return None, 0
    task = _task_of(loop)
    try:
        return task, task.cancelling()
    except AttributeError:  # no task, or a Task-like object without cancelling()
        return None, 0


def _format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


# -- context propagation ------------------------------------------------------------------------

# Set in the same Context as the OTel attach: resetting its token succeeds only in that Context,
# which tells us whether detaching the OTel token is possible here (an ``__aexit__`` awaited in
# another task, as ``parallel_resource_teardown`` does, runs in a copy) without OTel's
# "Failed to detach context" error.
_PROBE: contextvars.ContextVar[None] = contextvars.ContextVar("asyncdiag_probe")


class _Open:
    """An entered block with a span: what its exit needs. Keyed in ``Runtime.open`` by
    ``(id(obj), task)``; blocks of the same object re-entered in one task chain via ``prev``.
    """

    __slots__ = ("ctx", "enter_duration", "obj", "prev", "probe", "span", "task", "token")

    def __init__(self, span: Any, obj: Any, task: Any, rt: Runtime, current: Any) -> None:
        self.span = span
        self.obj = obj  # strong: the id() key must not be reused while this is open
        self.task = task
        self.ctx = trace.set_span_in_context(span, current)
        self.token = rt.attach(self.ctx)
        # Without a task (a coroutine driven by hand) the Context is identified by a probe.
        self.probe = _PROBE.set(None) if task is None else None
        self.enter_duration = 0.0
        self.prev: _Open | None = None


def _current_task_fast() -> Any:
    loop = _get_running_loop()
    return _task_of(loop) if loop is not None else None


def _same_context(record: _Open, task: Any) -> bool:
    """Whether the Context running now is the one that attached ``record``'s span: a task
    runs in its own Context, so the same task means the same Context."""
    if record.task is not None:
        return record.task is task
    if record.probe is None:
        return False
    try:
        _PROBE.reset(record.probe)
    except (ValueError, RuntimeError):
        return False
    record.probe = _PROBE.set(None)  # the token is single-use: keep one for a later check
    return True


def _detach(rt: Runtime, record: _Open, task: Any) -> None:
    """Make the span's parent current again, in the Context that attached it, if that is the
    Context running now and the span is still on top; otherwise leave it for later (the
    next block entered or left in that Context unwinds it)."""
    same = record.task is task if record.task is not None else _same_context(record, task)
    if same and rt.current_context() is record.ctx:
        rt.detach(record.token)
        if rt.pending_detach:
            _unwind(rt, task)
    elif len(rt.pending_detach) < MAX_OPEN:
        # Another task's Context (``__aexit__`` awaited elsewhere), or exits out of order:
        # another task's Context is not ours to change from here.
        rt.pending_detach[id(record.ctx)] = record


def _unwind(rt: Runtime, task: Any) -> None:
    """Detach spans that ended elsewhere (or out of order) and are now on top here."""
    pending = rt.pending_detach
    while pending:
        current = rt.current_context()
        record = pending.get(id(current))
        if record is None or record.ctx is not current or not _same_context(record, task):
            return
        del pending[id(current)]
        rt.detach(record.token)


def _push_open(rt: Runtime, record: _Open) -> None:
    opened = rt.open
    if len(opened) >= MAX_OPEN:
        # Blocks entered and never exited (their coroutine was dropped): end the oldest.
        stale: _Open | None = opened.pop(next(iter(opened)), None)
        while stale is not None:
            stale.span.set_attribute(_names.ATTR_OUTCOME, "abandoned")
            stale.span.end()
            stale = stale.prev
    key = (id(record.obj), record.task)
    record.prev = opened.get(key)
    opened[key] = record


def _pop_open(rt: Runtime, obj: Any, task: Any) -> _Open | None:
    opened = rt.open
    key = (id(obj), task)
    record = opened.pop(key, None)
    if record is None:
        # Exited in another task than the one that entered: find it by object.
        for other_key, other in list(opened.items()):
            if other_key[0] == id(obj) and other.obj is obj:
                key, record = other_key, opened.pop(other_key)
                break
        else:
            return None
    if record.prev is not None:
        opened[key] = record.prev
    return record if record.obj is obj else None


def end_all_open(rt: Runtime) -> None:
    """At uninstall: end the spans of blocks still open, and make their parents current
    again where that is possible from here (the uninstalling task's own blocks)."""
    task = _current_task_fast()
    records: list[_Open] = []
    for head in rt.open.values():
        record: _Open | None = head
        while record is not None:
            records.append(record)
            record = record.prev
    rt.open.clear()
    for entered in reversed(records):  # innermost (most recently entered) first
        try:
            entered.span.set_attribute(_names.ATTR_OUTCOME, "abandoned")
            entered.span.end()
            _detach(rt, entered, task)
        except Exception as internal:
            _safety.hook_failed(HOOK_NAME, internal)
    for iteration in list(rt.iterations.values()):
        if iteration.span is not None:
            iteration.span.set_attribute(_names.ATTR_OUTCOME, "abandoned")
            iteration.span.end()
    rt.iterations.clear()


def _end_with_span(
    rt: Runtime, record: _Open, outcome: str, exit_duration: float,
    exc_type: type[BaseException] | None, site: Site, task: Any,
) -> None:
    span = record.span
    _spans.set_attributes(span, {
        _names.ATTR_SUBJECT: site.subject,
        _names.ATTR_OUTCOME: outcome,
        "asyncdiag.enter.duration": record.enter_duration,
        "asyncdiag.exit.duration": exit_duration,
    })
    if outcome == "error" and exc_type is not None:
        span.set_status(Status(StatusCode.ERROR, exc_type.__qualname__))
    span.end()
    if (record.task is task and task is not None and not rt.pending_detach
            and rt.current_context() is record.ctx):
        rt.detach(record.token)  # the common case of _detach, without the call
    else:
        _detach(rt, record, task)


# -- async context managers ---------------------------------------------------------------------

def _outcome(exc_type: Any, suppress: Any) -> _names.Outcome:
    if exc_type is None:
        return "ok"
    if suppress:
        return "suppressed"
    if isinstance(exc_type, type) and issubclass(exc_type, _CancelledError):
        return "cancelled"
    return "error"


def _exit_findings(
    rt: Runtime, site: Site, frame: FrameType | None, exc_type: Any, suppress: Any,
    swallowed_new_cancel: bool, duration: float, span: Any,
) -> None:
    location = _location(frame)
    if exc_type is not None and suppress:
        if isinstance(exc_type, type) and issubclass(exc_type, _CancelledError):
            _findings.report(
                _names.SWALLOWED_CANCELLATION,
                f"{site.qualname}.__aexit__ returned {suppress!r} and suppressed "
                "CancelledError: the task was asked to stop and kept running",
                site.subject, location=location, task=_task_name(), span=span,
            )
        else:
            name = getattr(exc_type, "__qualname__", repr(exc_type))
            _findings.report(
                _names.SWALLOWED_EXCEPTION,
                f"{site.qualname}.__aexit__ returned {suppress!r} and suppressed {name}: "
                "the error raised in the `async with` body was silently discarded",
                site.subject, location=location, task=_task_name(), span=span,
            )
    elif swallowed_new_cancel:
        _findings.report(
            _names.SWALLOWED_CANCELLATION,
            f"{site.qualname}.__aexit__ caught a CancelledError delivered while it ran and "
            "returned normally: the task was asked to stop and kept running",
            site.subject, location=location, task=_task_name(), span=span,
        )
    if duration > rt.slow_teardown:
        _findings.report(
            _names.SLOW_TEARDOWN,
            f"{site.qualname}.__aexit__ took {_format_seconds(duration)} (threshold "
            f"{_format_seconds(rt.slow_teardown)})",
            site.subject, location=location, duration=duration, task=_task_name(), span=span,
        )


Caller = Callable[..., Awaitable[Any]]


def _dress(method: Any, original: Any) -> None:
    """Names and docs of the original (what help(), repr and inspect show), and the marks
    that say "instrumented" (no double patching) and how to reach the original."""
    if inspect.isfunction(original):
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            try:
                setattr(method, attr, getattr(original, attr))
            except (AttributeError, TypeError):
                pass
    method.__wrapped__ = original
    method.__asyncdiag_instrumented__ = True


def _open_span(rt: Runtime, obj: Any, site: Site) -> _Open | None:
    """At ``__aenter__`` when tracing: the block's span made current, or None if unsampled."""
    try:
        loop = _get_running_loop()
        task = _task_of(loop) if loop is not None else None
        if rt.pending_detach:
            _unwind(rt, task)
        # All attributes are set at the end, in one write (see ``_spans.set_attributes``);
        # the `async with` line is in findings, not on every span. The current Context is
        # passed in: without it the SDK looks it up three times (parent, sampler, new context).
        current = rt.current_context()
        if rt.mode == _spans.ASK and rt.mode_final:  # the sampler decides: no pre-check
            span = rt.tracer.start_span(site.with_span, context=current)
        else:
            span = rt.start_span(site.with_span, context=current)
        return _Open(span, obj, task, rt, current) if span is not None else None
    except Exception as internal:
        failed(internal)
        return None


def _enter_failed(rt: Runtime, site: Site, record: _Open | None, exc: BaseException,
                  duration: float) -> None:
    """``__aenter__`` raised ``exc`` (the block never ran)."""
    try:
        rt.telemetry.record_enter(site.subject, duration)
        if record is not None:
            record.enter_duration = duration
            outcome = "cancelled" if isinstance(exc, _CancelledError) else "error"
            _end_with_span(rt, record, outcome, 0.0, type(exc), site, record.task)
    except Exception as internal:
        failed(internal)


def _exit_failed(rt: Runtime, site: Site, record: _Open | None, exc: BaseException,
                 duration: float, task: Any, caller: FrameType) -> None:
    """``__aexit__`` raised ``exc``."""
    try:
        outcome: _names.Outcome = "cancelled" if isinstance(exc, _CancelledError) else "error"
        rt.telemetry.record_exit(site.subject, outcome, duration)
        if duration > rt.slow_teardown:
            _exit_findings(rt, site, caller, None, None, False, duration,
                           record.span if record is not None else None)
        if record is not None:
            _end_with_span(rt, record, outcome, duration, type(exc), site, task)
    except Exception as internal:
        failed(internal)


def _ok_exit_findings(rt: Runtime, site: Site, record: _Open | None, duration: float,
                      task: Any, cancelling: int, caller: FrameType) -> None:
    """``__aexit__`` returned with no exception in flight, already recorded, and took too long
    or kept a cancellation delivered into it."""
    new_cancel = cancelling >= 0 and task.cancelling() > cancelling
    _exit_findings(rt, site, caller, None, None, new_cancel, duration,
                   record.span if record is not None else None)


def _exited(rt: Runtime, site: Site, record: _Open | None, exc_type: Any, suppress: Any,
            duration: float, task: Any, cancelling: int, caller: FrameType) -> None:
    """``__aexit__`` returned with an exception in flight (the wrapper records the common
    case, no exception, itself)."""
    outcome = _outcome(exc_type, suppress)
    swallowed = bool(suppress)
    new_cancel = (
        cancelling >= 0 and outcome != "cancelled" and task.cancelling() > cancelling
    )
    rt.telemetry.record_exit(site.subject, outcome, duration)
    if swallowed or new_cancel or duration > rt.slow_teardown:
        _exit_findings(rt, site, caller, exc_type, suppress, new_cancel, duration,
                       record.span if record is not None else None)
    if record is not None:
        _end_with_span(rt, record, outcome, duration, exc_type, site, task)


# The instructions a coroutine suspends at (``await``, ``async for``, ``async with``), across
# the versions we support (3.10 delegates with YIELD_FROM, 3.11+ with SEND/YIELD_VALUE).
_SUSPENDING_OPCODES = frozenset(
    dis.opmap[name] for name in (
        "GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH", "SEND",
        "YIELD_VALUE", "YIELD_FROM",
    ) if name in dis.opmap
)


def may_suspend(func: Any) -> bool:
    """False only for a plain ``async def`` whose own code never awaits: it runs to the end
    in the step that calls it, so no cancellation can be delivered into it. Anything else
    (awaits somewhere, a wrapper, a descriptor, not a function) may."""
    if not inspect.isfunction(func) or not inspect.iscoroutinefunction(func):
        return True
    return any(
        instruction.opcode in _SUSPENDING_OPCODES
        for instruction in dis.get_instructions(func.__code__)
    )


def make_cm_methods(
    site: Site | None, call_enter: Caller, call_exit: Caller, *, owner: type | None,
) -> tuple[Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]]:
    """``__aenter__``/``__aexit__`` that measure the block and call the originals.

    ``owner``: the class they are patched on. They measure only when they are what
    ``async with`` finds on ``type(self)``; called through ``super()`` from an override (or on
    a subclass that overrides one of the pair) they pass through, so that one block is
    measured once. ``owner`` None (proxies): no such check. ``site`` None: read it from
    ``self._self_site`` (proxies).

    These two run around every instrumented block, so their common path (metrics only, no
    exception, nothing to report) is kept to the fewest bytecodes: every other case is in a
    helper above.
    """
    active = [True]
    # Whether a cancellation can reach the original __aexit__ at all. Finding the current task
    # is the largest single cost of an exit here (on 3.10/3.11 without the C extension,
    # asyncio's get_running_loop makes a getpid() system call): skipped when it cannot matter.
    check_cancel = _HAS_CANCELLING and may_suspend(call_exit)

    # Fixed signatures, those of the protocol: packing ``*args, **kwargs`` on every call
    # costs more than all the measuring (the interpreter, and code that calls the dunders by
    # hand, pass exactly these).
    async def __aenter__(self: Any) -> Any:
        rt = RUNTIME
        s = site if site is not None else self._self_site
        if rt is not None and s.fast is rt and (type(self) is owner or owner is None):
            # The common path, spelled out (a helper call would cost as much as the rest):
            # metrics only, this runtime's series bound, the method that `async with` found.
            t0 = perf_counter()
            try:
                result = await call_enter(self)
            except BaseException as exc:
                _enter_failed(rt, s, None, exc, perf_counter() - t0)
                _trim(exc, __aenter__.__code__)
                raise
            try:
                _record_since(s.enter, t0)
            except Exception as internal:
                failed(internal)
            return result
        if rt is None or not active[0] or (type(self) is not owner and owner is not None and (
            type(self).__aenter__ is not installed[0] or type(self).__aexit__ is not installed[1]
        )):
            return await call_enter(self)
        record = None
        if rt.tracing:
            try:
                blocks = rt.blocks
                record = blocks.open(s.with_span, self) if blocks is not None else NotImplemented
            except Exception as internal:
                failed(internal)
            if record is NotImplemented:
                record = _open_span(rt, self, s)
        t0 = perf_counter()
        try:
            result = await call_enter(self)
        except BaseException as exc:
            _enter_failed(rt, s, record, exc, perf_counter() - t0)
            _trim(exc, __aenter__.__code__)
            raise
        try:
            duration = _record_since(s.enter if s.runtime is rt else rt.bind(s).enter, t0)
            if record is not None:
                record.enter_duration = duration
                opened = rt.open
                key = (id(self), record.task)
                if len(opened) < MAX_OPEN and key not in opened:
                    opened[key] = record  # the common case of _push_open, without the call
                else:
                    _push_open(rt, record)
        except Exception as internal:
            failed(internal)
        return result

    async def __aexit__(self: Any, exc_type: Any, exc: Any, tb: Any) -> Any:
        rt = RUNTIME
        s = site if site is not None else self._self_site
        task: Any = None
        cancelling = -1  # not known
        if rt is not None and s.fast is rt and (type(self) is owner or owner is None):
            # The common path, as in __aenter__.
            if check_cancel:
                # A cancellation delivered into __aexit__ and caught there leaves the task's
                # count of pending cancellation requests higher than before.
                loop = _get_running_loop()
                if loop is not None:
                    task = _task_of(loop)
                    try:
                        cancelling = task.cancelling()
                    except AttributeError:  # no task, or a Task-like without cancelling()
                        pass
            t0 = perf_counter()
            try:
                suppress = await call_exit(self, exc_type, exc, tb)
            except BaseException as error:
                _exit_failed(rt, s, None, error, perf_counter() - t0, task, sys._getframe(1))
                _trim(error, __aexit__.__code__)
                raise
            try:
                if exc_type is None:
                    # Outcome "ok" whatever is found: recorded first, reported if need be.
                    duration = _record_since(s.exit_ok, t0)
                    if (duration > rt.slow_teardown
                            or (cancelling >= 0 and task.cancelling() > cancelling)):
                        _ok_exit_findings(rt, s, None, duration, task, cancelling,
                                          sys._getframe(1))
                else:
                    _exited(rt, s, None, exc_type, suppress, perf_counter() - t0, task,
                            cancelling, sys._getframe(1))
            except Exception as internal:
                failed(internal)
            return suppress
        if rt is None or not active[0] or (type(self) is not owner and owner is not None and (
            type(self).__aexit__ is not installed[1] or type(self).__aenter__ is not installed[0]
        )):
            return await call_exit(self, exc_type, exc, tb)
        record = None
        if check_cancel or rt.open:
            loop = _get_running_loop()
            if loop is not None:
                task = _task_of(loop)
                if check_cancel:
                    # A cancellation delivered into __aexit__ and caught there leaves the
                    # task's count of pending cancellation requests higher than before.
                    try:
                        cancelling = task.cancelling()
                    except AttributeError:
                        pass
            if rt.open:
                blocks = rt.blocks
                record = (blocks.pop(self, task) if blocks is not None
                          else _pop_open(rt, self, task))
        t0 = perf_counter()
        try:
            suppress = await call_exit(self, exc_type, exc, tb)
        except BaseException as error:
            _exit_failed(rt, s, record, error, perf_counter() - t0, task, sys._getframe(1))
            _trim(error, __aexit__.__code__)
            raise
        try:
            if exc_type is None:
                duration = _record_since(s.exit_ok if s.runtime is rt else rt.bind(s).exit_ok, t0)
                if duration > rt.slow_teardown or (cancelling >= 0
                                                   and task.cancelling() > cancelling):
                    _ok_exit_findings(rt, s, record, duration, task, cancelling,
                                      sys._getframe(1))
                if record is not None:
                    if type(record) is _Block:
                        rt.blocks.close(record, s.subject, "ok", duration, task)
                    else:
                        _end_with_span(rt, record, "ok", duration, None, s, task)
            else:
                _exited(rt, s, record, exc_type, suppress, perf_counter() - t0, task,
                        cancelling, sys._getframe(1))
        except Exception as internal:
            failed(internal)
        return suppress

    def disable() -> None:
        active[0] = False
        for method in installed:
            if _MeasuredDunder is not None and type(method) is _MeasuredDunder:
                method.active = False
        if site is not None:
            site.fast = None  # the common path does not read ``active``; a bind needs it

    pairs: tuple[tuple[Any, Caller], ...] = ((__aenter__, call_enter), (__aexit__, call_exit))
    for method, original in pairs:
        _dress(method, original)
        method._self_disable = disable
    # What goes on the class: these two functions, or (with the extension) the C objects that
    # stand for them and do their common paths without a coroutine of their own (see
    # _speedups.c, "Measured __aenter__ / __aexit__").
    installed: list[Any] = [__aenter__, __aexit__]
    if _MeasuredDunder is not None:
        helpers = _dunder_helpers()
        installed[:] = [
            _MeasuredDunder(__aenter__, call_enter, site, owner, False, False, helpers,
                            installed),
            _MeasuredDunder(__aexit__, call_exit, site, owner, True, check_cancel, helpers,
                            installed),
        ]
    return installed[0], installed[1]


def _dunder_helpers() -> tuple[Any, ...]:
    """What ``_speedups.MeasuredDunder`` calls and reads, in the order it expects."""
    return (
        failed, _enter_failed, _exit_failed, _ok_exit_findings, _exited,
        _end_with_span, _open_span, _push_open, _get_running_loop, _loops.TASK_SOURCE, MAX_OPEN,
    )


class AsyncCMProxy(_ObjectProxy):  # type: ignore[misc]
    """What an instrumented ``@asynccontextmanager`` function returns: its context manager,
    measured. ``isinstance`` and attribute access go to the wrapped object."""

    def __init__(self, wrapped: Any, site: Site) -> None:
        super().__init__(wrapped)
        self._self_site = site

    __aenter__, __aexit__ = make_cm_methods(
        None,
        lambda self: self.__wrapped__.__aenter__(),
        lambda self, exc_type, exc, tb: self.__wrapped__.__aexit__(exc_type, exc, tb),
        owner=None,
    )

    def __repr__(self) -> str:
        return repr(self.__wrapped__)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__wrapped__.__reduce_ex__(protocol)


# -- async generators ---------------------------------------------------------------------------

class _GenState:
    __slots__ = ("user_close",)

    def __init__(self) -> None:
        self.user_close = False


def _iteration_findings(
    rt: Runtime, site: Site, where: str | None, kind: str, duration: float | None,
    span: Any,
) -> None:
    if kind == _names.SLOW_TEARDOWN and duration is not None:
        message = (f"aclose() of {site.qualname} took {_format_seconds(duration)} "
                   f"(threshold {_format_seconds(rt.slow_teardown)})")
    else:
        message = (f"{site.qualname} caught a CancelledError delivered while it produced an "
                   "item and went on: the consuming task was asked to stop and kept running")
    _findings.report(kind, message, site.subject, location=where, duration=duration,
                     task=_task_name(), span=span)


def _end_iteration(
    rt: Runtime, site: Site, span: Any, outcome: str, items: int, started: float,
    first_item: float, last_timed_gap_max: float, timed: int, next_sum: float,
    reported: int,
) -> None:
    rt.telemetry.add_yields(site.subject, items - reported)
    if span is None:
        return
    end = perf_counter()
    attributes: dict[str, Any] = {
        _names.ATTR_OUTCOME: outcome,
        "asyncdiag.items": items,
    }
    if items > 1 and first_item:
        attributes["asyncdiag.gap.mean"] = (end - first_item) / items
    if timed:
        attributes["asyncdiag.next.mean"] = next_sum / timed
        attributes["asyncdiag.gap.max"] = last_timed_gap_max
    attributes["asyncdiag.duration"] = end - started
    _spans.set_attributes(span, attributes)
    if outcome == "error":
        span.set_status(Status(StatusCode.ERROR))
    span.end()


async def _observe(agen: Any, site: Site, state: _GenState) -> AsyncGenerator[Any, Any]:
    """Drive ``agen`` for the consumer, item by item, and measure the iteration.

    Forwards ``asend``/``athrow``/``aclose`` so the consumer cannot tell the difference; the
    iteration's span runs from here (the first ``__anext__``) to exhaustion, error, close or
    orphaning (closed by the loop's finalizer without the user calling ``aclose``). The common
    path of an item is the ``async for`` below, one decrement of a small int and one test:
    the first item and then one in ``TIMING_STRIDE`` take the slow path (clock reads,
    histogram, cancel check).
    """
    rt = RUNTIME
    caller = sys._getframe(1)
    where = _location(caller)
    del caller
    span = None
    started = perf_counter()
    if rt is not None and rt.tracing:
        try:
            attributes: dict[str, Any] = {_names.ATTR_SUBJECT: site.subject}
            if where is not None:
                path, _, line = where.rpartition(":")
                attributes["code.filepath"] = path
                attributes["code.lineno"] = int(line)
            span = rt.start_span(site.for_span, attributes)
        except Exception as internal:
            failed(internal)
            rt = None
    subject = site.subject
    # Items so far = counted + (window - left): ``left`` counts down to the next timed item.
    counted = 0
    window = left = 1 if rt is not None else -1  # -1: never reaches 0, never measured
    reported = 0
    timed = 0
    next_sum = 0.0
    gap_max = 0.0
    last_timed = 0.0
    first_item = 0.0
    t0 = started
    task, cancelling = _cancelling() if _HAS_CANCELLING else (None, 0)
    outcome = "ok"
    try:
        async for item in agen:
            left -= 1
            if not left:
                t1 = perf_counter()
                counted += window
                window = left = TIMING_STRIDE
                if rt is None or RUNTIME is not rt:
                    window = left = -1  # uninstalled (or failed) meanwhile: stop measuring
                else:
                    try:
                        if counted == 1:
                            first_item = t1
                        rt.telemetry.record_next(subject, t1 - t0)
                        next_sum += t1 - t0
                        if timed and t1 - last_timed > gap_max:
                            gap_max = t1 - last_timed
                        last_timed = t1
                        timed += 1
                        if task is not None and task.cancelling() > cancelling:
                            _iteration_findings(rt, site, where, _names.SWALLOWED_CANCELLATION,
                                                None, span)
                        if counted - reported >= _YIELDS_FLUSH:
                            rt.telemetry.add_yields(subject, counted - reported)
                            reported = counted
                    except Exception as internal:
                        failed(internal)
                        window = left = -1
            while True:
                try:
                    sent = yield item
                except GeneratorExit:
                    outcome = "closed" if state.user_close else "orphaned"
                    closing = perf_counter()
                    try:
                        await agen.aclose()
                    finally:
                        took = perf_counter() - closing
                        if rt is not None and took > rt.slow_teardown:
                            _iteration_findings(rt, site, where, _names.SLOW_TEARDOWN, took,
                                                span)
                    raise
                except BaseException as thrown:
                    try:
                        item = await agen.athrow(thrown)
                    except StopAsyncIteration:
                        return
                    counted += 1
                    continue
                if sent is None:
                    break
                try:
                    item = await agen.asend(sent)
                except StopAsyncIteration:
                    return
                counted += 1
            if left == 1:
                # The next request is the timed one: it alone is measured, not the consumer's
                # work on the items between two timed ones.
                if _HAS_CANCELLING:
                    task, cancelling = _cancelling()
                t0 = perf_counter()
    except GeneratorExit:
        raise
    except BaseException as exc:
        outcome = "cancelled" if isinstance(exc, _CancelledError) else "error"
        _trim(exc, _observe.__code__)
        raise
    finally:
        if rt is not None:
            try:
                items = counted + window - left if window > 0 else counted
                _end_iteration(rt, site, span, outcome, items, started, first_item, gap_max,
                               timed, next_sum, reported)
            except Exception as internal:
                failed(internal)


_OBSERVE_CODE = _observe.__code__


class _CountedRequests:
    """The per-item part of ``_Counted``, in Python: the reference for the C extension's
    ``CountedBase``, which does this as the type's ``__anext__`` slot, without a frame, and
    the base of ``_Counted`` where the extension is not built."""

    __slots__ = ("agen", "left")

    agen: Any
    left: int

    def __aiter__(self) -> Any:
        return self

    def __anext__(self) -> Any:
        left = self.left - 1
        self.left = left
        if left:
            # The builtin is a vectorcall; the bound ``agen.__anext__`` is a slower tp_call.
            return anext(self.agen)
        return self._timed(anext(self.agen))

    def asend(self, value: Any) -> Any:
        left = self.left - 1
        self.left = left
        if left:
            return self.agen.asend(value)
        return self._timed(self.agen.asend(value))

    def _timed(self, awaitable: Any) -> Any:
        raise NotImplementedError  # _CountedState's


_CountedBase: Any = _CountedRequests
try:
    from ._speedups import CountedBase as _CCountedBase
except ImportError:  # built without a C compiler
    pass
else:
    _CountedBase = _CCountedBase

# Metrics-only iteration (no span to end when the iteration ends) is counted by ``_Counted``
# rather than a delegating generator: always with the C extension (its __anext__ slot runs no
# Python code: +0.05 us per item on 3.11 and +0.13 on 3.10, against +0.23 and +0.35 for the
# delegating generator); without it on 3.12+ only, where one Python call per item costs less
# than a second async generator resumption (+0.19 against +0.50 us on 3.13), which on 3.10 and
# 3.11 is the cheaper of the two.
_COUNT_BY_CALL = sys.version_info >= (3, 12) or _CountedBase is not _CountedRequests


class _CountedState:
    """What ``async for`` drives over an instrumented generator when it only measures (see
    ``_COUNT_BY_CALL`` for where):
    the generator's own ``__anext__()`` awaitables, handed out as they are, counted; the first
    request and then one in ``TIMING_STRIDE`` go through ``_timed_request``. With no frame of
    ours between the consumer and the generator, values, exceptions and tracebacks are the
    generator's own.

    Items are requests that did not end the generator: when this object is released (the
    ``async for`` is over and the generator proxy dropped) the last request is not counted if
    the generator finished without ``aclose()``/``athrow()`` (it raised StopAsyncIteration or
    an error).
    """

    if not TYPE_CHECKING:
        # The concrete classes below hold the slots, next to their base's two (mypy would
        # check assignments against an empty tuple here).
        __slots__ = ()

    agen: Any
    left: int
    closed: bool
    counted: int
    reported: int
    rt: Runtime
    series: Any
    site: Site
    where: tuple[CodeType, int] | None
    window: int

    def __init__(self, agen: Any, site: Site, rt: Runtime) -> None:
        self.agen = agen
        self.site = site
        self.rt = rt
        self.series = site.next
        # Requests so far = counted + (window - left); ``left`` counts down to the next timed
        # request; -1 (never reaches 0): no longer measuring.
        self.counted = 0
        self.window = self.left = 1
        self.reported = 0
        # Ended by aclose() or athrow() (or settled), not by a request that then yielded
        # nothing.
        self.closed = False
        self.where: tuple[CodeType, int] | None = None  # the consumer's line, at the first

    def athrow(self, *args: Any) -> Any:
        return _counted_throw(self, self.agen.athrow(*args))

    def aclose(self) -> Any:
        agen = self.agen
        if agen.ag_frame is not None:  # not finished: this close, not a request, ends it
            self.closed = True
        return _timed_close(self, agen.aclose())

    def _timed(self, awaitable: Any) -> Any:
        self.counted += self.window
        rt = self.rt
        if RUNTIME is not rt:
            self.window = self.left = -1  # uninstalled (or failed) meanwhile: stop measuring
            return awaitable
        if self.where is None:
            try:
                frame = program_frame(sys._getframe(2))
                self.where = (frame.f_code, frame.f_lasti) if frame is not None else None
            except Exception as internal:
                failed(internal)
                return awaitable
        self.window = self.left = TIMING_STRIDE
        return _timed_request(self, awaitable)

    def settle(self) -> None:
        """The generator has finished: fix the count, measure no more."""
        self.counted = self.items()
        self.window = self.left = -1
        self.closed = True  # nothing left to take off at the end

    def location(self) -> str | None:
        return code_location(*self.where) if self.where is not None else None

    def items(self) -> int:
        requests = self.counted + (self.window - self.left if self.window > 0 else 0)
        if requests and not self.closed and self.agen.ag_frame is None:
            requests -= 1  # the request that found the generator finished yielded nothing
        return requests

    def __del__(self) -> None:
        rt = self.rt
        if RUNTIME is not rt:
            return
        try:
            unreported = self.items() - self.reported
            if unreported > 0:
                rt.telemetry.add_yields(self.site.subject, unreported)
        except Exception as internal:
            failed(internal)

    def __repr__(self) -> str:
        return repr(self.agen)


_COUNTED_SLOTS = ("closed", "counted", "reported", "rt", "series", "site", "where", "window")


class _Counted(_CountedState, _CountedBase):  # type: ignore[misc]
    """``_CountedState`` over the C ``CountedBase`` where the extension is built."""

    __slots__ = _COUNTED_SLOTS


class _CountedPython(_CountedState, _CountedRequests):
    """``_CountedState`` over the Python ``_CountedRequests`` (the same as ``_Counted``
    without the extension; tests compare the two)."""

    __slots__ = _COUNTED_SLOTS


# What AsyncGenProxy makes (tests switch it to _CountedPython).
_COUNTED: type[_CountedState] = _Counted


async def _timed_request(counted: _CountedState, awaitable: Any) -> Any:
    task, cancelling = _cancelling()
    t0 = perf_counter()
    try:
        item = await awaitable
    except BaseException as exc:
        _trim(exc, _TIMED_REQUEST_CODE)
        raise
    try:
        _record_since(counted.series, t0)
        if task is not None and task.cancelling() > cancelling:
            _iteration_findings(counted.rt, counted.site, counted.location(),
                                _names.SWALLOWED_CANCELLATION, None, None)
        if counted.counted - counted.reported >= _YIELDS_FLUSH:
            counted.rt.telemetry.add_yields(counted.site.subject,
                                            counted.counted - counted.reported)
            counted.reported = counted.counted
    except Exception as internal:
        failed(internal)
    return item


_TIMED_REQUEST_CODE = _timed_request.__code__


async def _counted_throw(counted: _CountedState, awaitable: Any) -> Any:
    try:
        item = await awaitable
    except BaseException as exc:
        counted.closed = True  # the thrown exception ended it (or came back out)
        _trim(exc, _COUNTED_THROW_CODE)
        raise
    counted.counted += 1
    return item


_COUNTED_THROW_CODE = _counted_throw.__code__


async def _timed_close(counted: _CountedState, awaitable: Any) -> Any:
    closing = perf_counter()
    try:
        return await awaitable
    except BaseException as exc:
        _trim(exc, _TIMED_CLOSE_CODE)
        raise
    finally:
        took = perf_counter() - closing
        rt = counted.rt
        if RUNTIME is rt and took > rt.slow_teardown:
            try:
                _iteration_findings(rt, counted.site, counted.location(),
                                    _names.SLOW_TEARDOWN, took, None)
            except Exception as internal:
                failed(internal)


_TIMED_CLOSE_CODE = _timed_close.__code__


class AsyncGenProxy(_ObjectProxy):  # type: ignore[misc]
    """An instrumented async generator. ``isinstance(p, types.AsyncGeneratorType)`` and
    ``inspect.isasyncgen(p)`` are true and every attribute (``ag_frame``, ``__name__``...) is
    the generator's; ``type(p)`` is this class and ``aiter(p)`` is what ``async for`` drives
    (not ``p`` itself): the delegating generator ``_observe``, or, when no span is recorded
    (and ``_COUNT_BY_CALL``), ``_Counted``."""

    def __init__(self, wrapped: Any, site: Site) -> None:
        super().__init__(wrapped)
        self._self_state = _GenState()
        rt = RUNTIME
        if _COUNT_BY_CALL and rt is not None and (
            site.fast if site.runtime is rt else rt.bind(site).fast
        ) is rt:
            self._self_iter: Any = _COUNTED(wrapped, site, rt)
            return
        delegate: Any = _observe(wrapped, site, self._self_state)
        # What a repr, the orphaned-generator finding or a debugger shows for the generator
        # that ``async for`` drives: the user's generator's names, not ours.
        try:
            delegate.__name__ = wrapped.__name__
            delegate.__qualname__ = wrapped.__qualname__
        except (AttributeError, TypeError):
            pass
        self._self_iter = delegate

    def __aiter__(self) -> Any:
        it = self._self_iter
        if isinstance(it, _CountedState) and it.window > 0 and it.agen.ag_frame is None:
            it.settle()  # iterated again once finished: the requests from now on yield nothing
        return it

    def __anext__(self) -> Any:
        return self._self_iter.__anext__()

    def asend(self, value: Any) -> Any:
        return self._self_iter.asend(value)

    def athrow(self, *args: Any) -> Any:
        return self._self_iter.athrow(*args)

    def aclose(self) -> Any:
        self._self_state.user_close = True
        return self._self_iter.aclose()

    def __repr__(self) -> str:
        return repr(self.__wrapped__)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__wrapped__.__reduce_ex__(protocol)


def is_internal_asyncgen(agen: Any) -> bool:
    """True for the delegating generators made here (for the orphaned-generator tracker: the
    user's own generator is the one to report, not ours)."""
    return getattr(agen, "ag_code", None) is _OBSERVE_CODE


def wrapped_asyncgen(agen: Any) -> Any:
    """The user's generator that one of our delegating generators drives, else None. Meant
    for rare paths (a finalizer, a finding): it reads the suspended frame's locals."""
    if getattr(agen, "ag_code", None) is not _OBSERVE_CODE:
        return None
    frame = getattr(agen, "ag_frame", None)
    if frame is None:
        return None
    return frame.f_locals.get("agen")


# -- class-based async iterators ----------------------------------------------------------------

class _Iteration:
    __slots__ = ("items", "ref", "span", "started", "where")

    def __init__(self, span: Any, started: float, where: str | None, ref: Any) -> None:
        self.span = span
        self.started = started
        self.where = where
        self.items = 0
        self.ref = ref


def _finish_class_iteration(rt: Runtime, key: int, site: Site, outcome: str) -> None:
    iteration = rt.iterations.pop(key, None)
    if iteration is None or iteration.span is None:
        return
    _spans.set_attributes(iteration.span, {
        _names.ATTR_OUTCOME: outcome,
        "asyncdiag.items": iteration.items,
        "asyncdiag.duration": perf_counter() - iteration.started,
    })
    if outcome == "error":
        iteration.span.set_status(Status(StatusCode.ERROR))
    iteration.span.end()


def make_anext(site: Site, call_next: Caller) -> Callable[..., Awaitable[Any]]:
    """``__anext__`` for a class-based async iterator, patched on the class."""
    active = [True]

    async def __anext__(self: Any) -> Any:
        rt = RUNTIME
        if rt is None or not active[0] or type(self).__anext__ is not __anext__:
            return await call_next(self)
        key = id(self)
        task = None
        cancelling = 0
        try:
            iteration = rt.iterations.get(key)
            if iteration is None or (iteration.ref is not None and iteration.ref() is not self):
                iteration = _begin_class_iteration(rt, self, key, site)
            if _HAS_CANCELLING:
                task, cancelling = _cancelling()
        except Exception as internal:
            failed(internal)
            return await call_next(self)
        t0 = perf_counter()
        try:
            item = await call_next(self)
        except StopAsyncIteration as exc:
            try:
                rt.telemetry.record_next(site.subject, perf_counter() - t0)
                _finish_class_iteration(rt, key, site, "ok")
            except Exception as internal:
                failed(internal)
            _trim(exc, __anext__.__code__)
            raise
        except BaseException as exc:
            try:
                rt.telemetry.record_next(site.subject, perf_counter() - t0)
                outcome = "cancelled" if isinstance(exc, _CancelledError) else "error"
                _finish_class_iteration(rt, key, site, outcome)
            except Exception as internal:
                failed(internal)
            _trim(exc, __anext__.__code__)
            raise
        t1 = perf_counter()
        try:
            telemetry = rt.telemetry
            telemetry.record_next(site.subject, t1 - t0)
            telemetry.add_yields(site.subject, 1)
            iteration.items += 1
            if task is not None and task.cancelling() > cancelling:
                _iteration_findings(rt, site, _location(sys._getframe(1)),
                                    _names.SWALLOWED_CANCELLATION, None, iteration.span)
        except Exception as internal:
            failed(internal)
        return item

    def disable() -> None:
        active[0] = False

    _dress(__anext__, call_next)
    __anext__._self_disable = disable  # type: ignore[attr-defined]
    return __anext__


def _begin_class_iteration(rt: Runtime, obj: Any, key: int, site: Site) -> _Iteration:
    if len(rt.iterations) >= MAX_OPEN:
        _finish_class_iteration(rt, next(iter(rt.iterations)), site, "abandoned")
    span = None
    where = None
    if rt.tracing:
        frame = sys._getframe(2)
        where = _location(frame)
        span = rt.start_span(site.for_span, {
            _names.ATTR_SUBJECT: site.subject,
            "code.filepath": frame.f_code.co_filename,
            "code.lineno": frame.f_lineno,
        })
        del frame

    def orphaned(_ref: Any, rt: Runtime = rt, key: int = key) -> None:
        # The iterator was collected before it was exhausted: end its span.
        try:
            iteration = rt.iterations.get(key)
            if iteration is not None and iteration.ref is _ref:
                _finish_class_iteration(rt, key, site, "orphaned")
        except Exception as internal:
            failed(internal)

    try:
        ref: Any = weakref.ref(obj, orphaned)
    except TypeError:
        ref = None
    iteration = _Iteration(span, perf_counter(), where, ref)
    rt.iterations[key] = iteration
    return iteration


# -- generator functions and @asynccontextmanager functions -------------------------------------

class InstrumentedFunction(_FunctionWrapper):  # type: ignore[misc]
    """An instrumented async generator function or ``@asynccontextmanager`` function. Without
    an installed agent it returns exactly what the function returns."""

    def __init__(self, wrapped: Any, site: Site, kind: str) -> None:
        active = [True]
        proxy = AsyncGenProxy if kind == "asyncgen" else AsyncCMProxy

        def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            result = wrapped(*args, **kwargs)
            if RUNTIME is None or not active[0]:
                return result
            try:
                return proxy(result, site)
            except Exception as internal:
                failed(internal)
                return result

        def disable() -> None:
            active[0] = False

        super().__init__(wrapped, wrapper)
        self._self_site = site
        self._self_kind = kind
        self._self_disable = disable

    def __repr__(self) -> str:
        return repr(self.__wrapped__)


def python_hot_paths() -> list[tuple[Any, str, Any]]:
    """``(owner, attribute, value)`` that put the Python reference of each C hot path of the
    instrumentation in its place, as an install without the C extension runs. The tests and
    the benchmark set them (before ``install``) to compare the two."""
    return [
        (sys.modules[__name__], "_MeasuredDunder", None),  # make_cm_methods' functions
        (sys.modules[__name__], "_BlockOps", None),  # _open_span, _pop_open, _end_with_span
        (sys.modules[__name__], "_COUNTED", _CountedPython),
        # Without the extension, 3.10/3.11 count through the delegating generator.
        (sys.modules[__name__], "_COUNT_BY_CALL", sys.version_info >= (3, 12)),
        (_telemetry, "_fold_into", _telemetry._fold_into_python),
        # AsyncCMProxy's pair was made at import: the Python functions they stand for.
        *((AsyncCMProxy, name, getattr(vars(AsyncCMProxy)[name], "reference",
                                       vars(AsyncCMProxy)[name]))
          for name in ("__aenter__", "__aexit__")),
    ]
