"""One watchdog thread per process that watches every monitored event loop.

Why a thread and a heartbeat rather than timing each step: timing every loop step means patching
``asyncio.events.Handle._run`` (measured at 300-400 ns per step, 6-8 % of a workload of many
small tasks) and is impossible on uvloop, whose handles are compiled. Instead:

* Every ``poll`` seconds the watchdog posts a *beat* to each loop with
  ``call_soon_threadsafe``. The beat runs at the loop's next turn, records the scheduling delay
  (``asyncdiag.loop.lag``) and the time it ran. A beat that is still pending means the loop has
  not turned since it was posted: a step is running (or a batch of steps).
* Every poll the watchdog also samples the loop thread's innermost frame
  (``sys._current_frames()``) and derives the *step identity*: the current task
  (``asyncio.current_task(loop)`` works from another thread) and the step's entry frame (the
  frame called by the loop machinery, found by walking down to the frame that called the beat).
  A step therefore started at most one poll before the first sample that showed its identity,
  and never before the last beat ran. A step looked at closely has its stack copied as plain
  data in the same breath, before the watchdog does anything that lets the loop thread run on.
* When the pending beat finally runs (or the identity changes), the step is over; if it lasted
  longer than ``slow_callback_duration`` it becomes a ``slow_callback`` finding naming the task
  and the line most often seen running. While it is still running past ``blocked_threshold`` it
  becomes one ``loop_blocked`` finding with the loop thread's stack.

The per-step cost on the loop is zero; the loop pays one small callback per poll. Durations are
measured to within one poll interval (``poll = min(thresholds) / 2``). All loops are held
weakly; a closed or collected loop is dropped, and the thread exits when no loop is left.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import collections
import contextvars
import logging
import sys
import sysconfig
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

from . import _findings, _names, _safety
from ._asyncio_warnings import subject_of
from ._frames import is_own_machinery

logger = logging.getLogger("asyncdiag")

_monotonic = time.monotonic
monotonic = _monotonic
# The watchdog re-checks each loop's exception-handler chain every this many polls.
_CHECK_EVERY = 16

# Frames in these directories are "library" frames: the location of a finding prefers the
# innermost frame outside them, so that a blocking call inside a library points at the
# application line that made it (the full stack is still attached).
_PATHS = sysconfig.get_paths()
_STDLIB_DIRS: tuple[str, ...] = tuple(
    sorted({p.rstrip("/") + "/" for k in ("stdlib", "platstdlib") if (p := _PATHS.get(k))})
)
_LIBRARY_DIRS: tuple[str, ...] = tuple(
    sorted(
        set(_STDLIB_DIRS)
        | {p.rstrip("/") + "/" for k in ("purelib", "platlib") if (p := _PATHS.get(k))}
    )
)
_MAX_STACK = 40
# How far down the loop thread's stack the watchdog looks for the step's entry frame.
_MAX_DEPTH = 500


def _qualname(code: Any) -> str:
    return str(getattr(code, "co_qualname", None) or code.co_name)


def _is_library(filename: str, dirs: tuple[str, ...] = _LIBRARY_DIRS) -> bool:
    return filename.startswith(dirs) or filename.startswith("<frozen")


RawFrame = tuple[str, int, str]  # filename, line, function
RawStack = tuple[RawFrame, ...]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The loop thread's stack at one sample, as plain data: keeps no frame (nor its locals)
    alive, and no longer moves when the loop thread runs on."""

    stack: RawStack  # the thread's innermost frames (at most _MAX_STACK), outermost first
    step_frames: int  # how many of the innermost ones belong to the step (down to its entry)
    location: str

    def step_stack(self) -> RawStack:
        return self.stack[-self.step_frames:]


def _snapshot(top: FrameType, entry: FrameType) -> _Snapshot:
    """Copy the stack from ``top`` down to the step's ``entry`` frame, and on to _MAX_STACK
    frames of the thread, in one walk. The frames are live: each ``f_lineno`` is read once, so
    that a finding's location, its slow_callback stack and its loop_blocked stack all show the
    same moment; read again later, they would show wherever the loop thread had got to."""
    inner_first: list[RawFrame] = []
    step = 0
    frame: FrameType | None = top
    while frame is not None and (not step or len(inner_first) < _MAX_STACK) \
            and len(inner_first) < _MAX_DEPTH:
        code = frame.f_code
        inner_first.append((code.co_filename, frame.f_lineno or 0, code.co_name))
        if frame is entry:
            step = len(inner_first)
        frame = frame.f_back
    if not step:
        # The entry frame is no longer below top: the loop thread got the GIL back since
        # _step_of (a forced switch) and the step's coroutine suspended, which leaves its
        # frames without a caller. Take what was seen.
        step = len(inner_first)
    location = _location(inner_first, step)
    del inner_first[_MAX_STACK:]
    inner_first.reverse()
    return _Snapshot(tuple(inner_first), min(step, _MAX_STACK), location)


def _location(inner_first: Sequence[RawFrame], step: int) -> str:
    """The line a finding points at, among the step's ``step`` innermost frames."""
    # Application code first; an application installed into site-packages still beats
    # the standard library; else the innermost frame.
    for dirs in (_LIBRARY_DIRS, _STDLIB_DIRS):
        for index in range(step):
            filename, lineno, _ = inner_first[index]
            if not _is_library(filename, dirs):
                return f"{filename}:{lineno}"
    filename, lineno, _ = inner_first[0]
    return f"{filename}:{lineno}"


def _format_stack(raw: RawStack) -> tuple[str, ...]:
    """Formatted with source lines: only for a finding, and only in the watchdog thread."""
    summary = traceback.StackSummary.from_list(
        [traceback.FrameSummary(filename, lineno, name) for filename, lineno, name in raw]
    )
    return tuple(summary.format())


@dataclass(slots=True)
class _Sample:
    """What one poll saw of one loop, read before the watchdog acts on any loop."""

    running: bool
    pending: bool  # a beat was posted and has not run: the loop has not turned since
    identity: tuple[int, int] | None = None  # (task, entry frame) of the step running
    task: asyncio.Task[Any] | None = None
    entry_code: CodeType | None = None
    snapshot: _Snapshot | None = None  # only for a step old enough to be looked at closely


@dataclass
class _Stall:
    """A step seen running while the loop was not turning."""

    identity: tuple[int, int]
    start: float
    seq: int  # the beat pending when the stall was first seen
    subject: str
    task: str | None
    span: Any
    locations: collections.Counter[str] = field(default_factory=collections.Counter)
    stacks: dict[str, RawStack] = field(default_factory=dict)
    blocked_reported: bool = False
    # The loop thread's time spent runnable but not running (Linux schedstat), at the start.
    waited_at_start: int | None = None
    waited_last: int | None = None  # the same, at the last poll that still saw the stall

    def main_location(self) -> str | None:
        if not self.locations:
            return None
        return self.locations.most_common(1)[0][0]


class LoopState:
    """What the watchdog knows about one loop. Fields written by the loop thread (in ``beat``)
    and read by the watchdog are single attribute stores, atomic under the GIL."""

    __slots__ = (
        "__weakref__",
        "base_code",
        "exact",
        "last_poll",
        "last_run",
        "loop_ref",
        "native_id",
        "pending_seq",
        "posted_at",
        "ran_seq",
        "run_identity",
        "run_since",
        "stale",
        "stall",
        "thread_id",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, thread_id: int | None) -> None:
        self.loop_ref: weakref.ref[asyncio.AbstractEventLoop] = weakref.ref(loop)
        self.thread_id = thread_id
        self.native_id: int | None = None
        self.base_code: Any = None
        self.pending_seq = 0  # last beat posted
        self.ran_seq = 0  # last beat that ran
        self.posted_at = 0.0
        self.last_run = _monotonic()
        self.last_poll = self.last_run
        self.stale = False  # the loop stopped while a beat was pending: its lag is meaningless
        self.run_identity: tuple[int, int] | None = None
        self.run_since = 0.0
        self.stall: _Stall | None = None
        # Exact durations measured by asyncio's own debug mode, (monotonic time, seconds,
        # description), handed over by the debug-log filter so that the finding uses them.
        self.exact: collections.deque[tuple[float, float, str]] = collections.deque(maxlen=16)

    def prime(self, loop: asyncio.AbstractEventLoop) -> None:
        """From the loop thread, inside the callback that announces a run: learn the frame the
        loop calls steps from right now (the first step may block before any beat runs: a
        service's start-up often does), and queue a first beat."""
        self.thread_id = threading.get_ident()
        self.native_id = threading.get_native_id()
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and is_own_machinery(frame.f_code.co_filename):
            frame = frame.f_back
        if frame is not None:
            self.base_code = frame.f_code
        self.stale = True
        loop.call_soon(self.beat, self.ran_seq)

    def beat(self, seq: int) -> None:
        """Runs inside the loop. Kept tiny: it runs every poll on every loop."""
        now = _monotonic()
        # uvloop calls steps straight from the frame that runs the loop, which may differ from
        # one run to the next: refresh it every beat (a frame lookup, ~0.1 µs).
        self.base_code = sys._getframe(1).f_code
        self.thread_id = threading.get_ident()
        self.native_id = threading.get_native_id()
        lag = now - self.posted_at
        self.last_run = now
        if seq <= self.ran_seq:
            # A prime's beat, possibly after a posted beat already ran (a run can be announced
            # twice: Runner discovery, then run_forever). It measures no lag (posted_at is not
            # its own) and must not move ran_seq back, or the watchdog would wait forever for a
            # beat that already ran and post no more: no lag metric, no end of stalls.
            return
        self.ran_seq = seq
        if self.stale:
            self.stale = False
            return
        monitor = _MONITOR
        if monitor is not None and monitor.record_lag is not None and lag >= 0.0:
            monitor.record_lag(lag)


@dataclass
class Settings:
    slow_callback_duration: float
    blocked_threshold: float
    record_lag: Callable[[float], None] | None
    record_slow: Callable[[float], None] | None

    @property
    def poll(self) -> float:
        # Half the smaller threshold: every step longer than it still gets at least one sample
        # after sample_after (a poll lands in [start + threshold/2, start + threshold]), and each
        # wake-up of this thread costs the loop thread measurably (a second runnable thread makes
        # every epoll_wait slower): one fifth of the threshold cost asyncio loops 5-8 %.
        return min(max(min(self.slow_callback_duration, self.blocked_threshold) / 2, 0.001), 0.5)


class Watchdog:
    """The process-wide watchdog: a registry of loop states and the thread that polls them."""

    def __init__(
        self,
        settings: Settings,
        per_loop: Callable[[asyncio.AbstractEventLoop], None] | None = None,
    ) -> None:
        self.settings = settings
        self._per_loop = per_loop
        self._sample_after = min(settings.slow_callback_duration, settings.blocked_threshold) / 2
        self._polls = 0
        self.record_lag = settings.record_lag
        self._lock = threading.Lock()
        self._states: dict[int, LoopState] = {}
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        # Completed polling rounds, for settle(): notified at the end of every round.
        self._rounds = 0
        self._round_done = threading.Condition(threading.Lock())
        self._stopping = False
        self._had_loops = False
        # Set when this round did something that may release the GIL (file I/O, logging): the
        # frames sampled at the start of the round may then be out of date.
        self._gil_released = False
        self._empty_context = contextvars.Context()

    # -- registry ---------------------------------------------------------------------------
    def watch(self, loop: asyncio.AbstractEventLoop, thread_id: int | None) -> LoopState:
        with self._lock:
            key = id(loop)
            state = self._states.get(key)
            if state is None or state.loop_ref() is not loop:
                state = LoopState(loop, thread_id)
                self._states[key] = state
                self._had_loops = True
                self._wake.set()  # a thread started ahead, waiting for its first loop
            elif thread_id is not None:
                state.thread_id = thread_id
            self._ensure_thread()
            return state

    def start(self) -> None:
        """Start the thread ahead of the first loop (from ``install()``, normally not on a
        loop thread): ``Thread.start()`` waits for the new thread to boot, a wait better not
        spent inside a loop's first step. It waits idle until a loop is watched."""
        with self._lock:
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        if not self._stopping and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(
                target=self._run, name="asyncdiag-watchdog", daemon=True
            )
            self._thread.start()

    def state_for(self, loop: asyncio.AbstractEventLoop) -> LoopState | None:
        state = self._states.get(id(loop))
        if state is not None and state.loop_ref() is loop:
            return state
        return None

    def states(self) -> list[LoopState]:
        with self._lock:
            return list(self._states.values())

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def settle(self, *, thorough: bool = False, slack: float = 1.0) -> None:
        """Return once the steps that ended before this call have been judged (a slow one
        reported). The watchdog reports a slow step at its first poll after the step ended, so
        a caller that reads findings right after ``asyncio.run`` returned would otherwise race
        it. Cheap mode returns at once unless a step is being timed; thorough mode also waits
        for a poll of every loop. Bounded by two polls plus ``slack`` (a starved watchdog);
        a no-op on the watchdog thread or when it is not running."""
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return
        if not thorough and not any(state.stall is not None for state in self.states()):
            return
        with self._round_done:
            # The round under way may have sampled the frames before the step ended: wait for
            # the end of the one after it.
            target = self._rounds + 2
            self._wake.set()
            self._round_done.wait_for(
                lambda: self._rounds >= target or self._thread is not thread,
                timeout=2 * self.settings.poll + slack,
            )

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
            self._states.clear()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._run_rounds()
        finally:
            with self._round_done:
                self._round_done.notify_all()

    def _run_rounds(self) -> None:
        poll = self.settings.poll
        while not self._stopping:
            if _safety.is_disabled("loop watchdog"):
                break
            try:
                outcome = self._poll_all()
            except Exception as exc:
                _safety.hook_failed("loop watchdog", exc)
                break
            with self._round_done:
                self._rounds += 1
                self._round_done.notify_all()
            if outcome == "done":
                break
            if outcome == "idle":
                self._wake.wait()
            else:
                self._wake.wait(poll)
            if not self._stopping:
                self._wake.clear()
        with self._lock:
            if self._thread is threading.current_thread():
                self._thread = None

    def _poll_all(self) -> str:
        """One round over every loop: "polled", "idle" (no loop yet: wait for one) or "done"
        (every watched loop is gone: the thread ends with them)."""
        with self._lock:
            items = list(self._states.items())
            if not items:
                if not self._had_loops:
                    return "idle"
                # Decided under the lock so that watch() starts a new thread if a loop arrives.
                self._thread = None
                return "done"
        frames = sys._current_frames()
        self._gil_released = False
        now = _monotonic()
        self._polls += 1
        check = self._per_loop is not None and self._polls % _CHECK_EVERY == 0
        # Every loop is sampled before any is acted on: acting may release the GIL (the
        # /proc reads, reports, logging, a contended lock), and the loop threads then run on,
        # so frames read afterwards would no longer show the moment of the sample.
        samples: list[tuple[int, LoopState, asyncio.AbstractEventLoop | None, _Sample | None]]
        samples = []
        for key, state in items:
            loop = state.loop_ref()
            sample = None
            if loop is not None and not loop.is_closed():
                sample = self._sample(state, loop, frames, now)
            samples.append((key, state, loop, sample))
        del frames
        for key, state, loop, sample in samples:
            if loop is None or sample is None:
                self._finish_stall(state, now)
                with self._lock:
                    if self._states.get(key) is state:
                        del self._states[key]
                continue
            self._poll(state, loop, sample, now)
            state.last_poll = now
            if state.exact:
                self._report_unmatched_exact(state, now)
            if check and self._per_loop is not None:
                self._per_loop(loop)
        return "polled"

    def _sample(
        self,
        state: LoopState,
        loop: asyncio.AbstractEventLoop,
        frames: dict[int, FrameType],
        now: float,
    ) -> _Sample:
        """Read what ``_poll`` needs from the loop thread: no I/O, no lock, no logging, so
        that nothing here hands the GIL to the loop thread."""
        pending = state.pending_seq != state.ran_seq
        if not loop.is_running():
            return _Sample(False, pending)
        top = frames.get(state.thread_id) if state.thread_id is not None else None
        entry, task = self._step_of(state, loop, top)
        if top is None or entry is None:
            return _Sample(True, pending)
        identity = (id(task), id(entry))
        snapshot = None
        # Copy the stack only where _poll may look closely (the same step as last poll, run
        # for sample_after already; a new step's run starts now): not on every poll.
        if pending and identity == state.run_identity and (
            state.stall is not None
            or now - max(state.run_since, state.last_run) >= self._sample_after
        ):
            snapshot = _snapshot(top, entry)
        return _Sample(True, pending, identity, task, entry.f_code, snapshot)

    def _poll(
        self,
        state: LoopState,
        loop: asyncio.AbstractEventLoop,
        sample: _Sample,
        now: float,
    ) -> None:
        if not sample.running:
            if sample.pending:
                state.stale = True
            self._finish_stall(state, now)
            state.run_identity = None
            return
        pending = sample.pending
        identity = sample.identity
        if identity == state.run_identity and now - state.last_poll > 2.5 * self.settings.poll:
            # The watchdog itself was not scheduled for a while (overloaded machine): no beat
            # was posted, so loop turns in the gap went unseen and the same task/frame may be
            # several steps. Restart the run rather than merge them into one false "slow" step.
            state.run_since = now
        if identity != state.run_identity:
            # A different step (or none) is running now: the previous one ended since the last
            # poll.
            self._finish_stall(state, now)
            state.run_identity = identity
            state.run_since = now
        elif not pending and state.stall is not None:
            self._finish_stall(state, now)
        start = max(state.run_since, state.last_run)
        # A step is looked at closely only once it has run for half the smaller threshold:
        # the batches of short steps of a busy loop cost the watchdog nothing more.
        snapshot, entry_code = sample.snapshot, sample.entry_code
        if pending and identity is not None and snapshot is not None and \
                entry_code is not None and (
                    state.stall is not None or now - start >= self._sample_after):
            self._gil_released = True  # schedstat reads, reports
            stall = state.stall
            if stall is None:
                stall = self._new_stall(loop, sample.task, entry_code, identity, start,
                                        state.pending_seq)
                stall.waited_at_start = _runqueue_wait(state.native_id)
                state.stall = stall
            else:
                stall.waited_last = _runqueue_wait(state.native_id)
            # From the snapshot only: the live frames have moved on since (the /proc read
            # above let the loop thread run), and a location from one moment with a stack
            # from another would point at a line the stack does not show.
            location = snapshot.location
            stall.locations[location] += 1
            if location not in stall.stacks:
                stall.stacks[location] = snapshot.step_stack()
            blocked_for = now - stall.start
            if not stall.blocked_reported and blocked_for >= self.settings.blocked_threshold:
                stall.blocked_reported = True
                self._report_blocked(state, stall, snapshot, blocked_for)
        if not pending:
            if state.stale:
                state.stale = False
            state.pending_seq += 1
            state.posted_at = _monotonic()
            try:
                call_soon_quietly = getattr(loop, "_call_soon", None)
                if identity is not None and not self._gil_released and \
                        call_soon_quietly is not None and \
                        isinstance(loop, asyncio.base_events.BaseEventLoop):
                    # The loop thread is inside a step (sampled under the GIL we still hold):
                    # its next iteration sees a non-empty ready queue and does not wait in
                    # select(), so the beat needs no wake-up. Skipping call_soon_threadsafe's
                    # self-pipe write spares a syscall and a GIL hand-off per poll.
                    call_soon_quietly(state.beat, (state.pending_seq,), self._empty_context)
                else:
                    loop.call_soon_threadsafe(state.beat, state.pending_seq,
                                              context=self._empty_context)
            except RuntimeError:  # closed between the check and the call
                state.pending_seq = state.ran_seq

    def _step_of(
        self, state: LoopState, loop: asyncio.AbstractEventLoop, top: FrameType | None
    ) -> tuple[FrameType | None, asyncio.Task[Any] | None]:
        """The entry frame of the step running on ``loop`` (None when idle) and its task."""
        base = state.base_code
        if top is None or base is None:
            return None, None
        frame: FrameType | None = top
        entry: FrameType | None = None
        depth = 0
        while frame is not None and depth < _MAX_DEPTH:
            back = frame.f_back
            if back is not None and back.f_code is base:
                entry = frame
                break
            if frame.f_code is base:
                break
            frame = back
            depth += 1
        if entry is None:
            return None, None
        try:
            task = asyncio.current_task(loop)
        except Exception:  # a loop without task support: treat the step as a callback
            task = None
        return entry, task

    @staticmethod
    def _new_stall(
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any] | None,
        entry_code: CodeType,
        identity: tuple[int, int],
        start: float,
        seq: int,
    ) -> _Stall:
        if task is not None:
            coro = task.get_coro()
            code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
            subject = _qualname(code) if code is not None else repr(coro)
            return _Stall(identity, start, seq, subject, task.get_name(), _span_of(task))
        return _Stall(identity, start, seq, _qualname(entry_code), None, None)

    def _finish_stall(self, state: LoopState, now: float) -> None:
        stall = state.stall
        if stall is None:
            return
        self._gil_released = True
        state.stall = None
        # The beat pending during the stall runs right after the step (and the rest of its
        # batch); without it, the step ended between the last poll and this one.
        finished = state.last_run if state.ran_seq >= stall.seq else state.last_poll
        duration = max(finished - stall.start, 0.0)
        description = ""
        # asyncio's debug mode measured this step exactly: prefer its number.
        for item in list(state.exact):
            seen_at, seconds, desc = item
            if stall.start - 0.001 <= seen_at <= now + 0.001:
                state.exact.remove(item)
                duration, description = seconds, desc
        starved = 0.0
        if stall.waited_at_start is not None and stall.waited_last is not None \
                and not description:
            # Only what was seen while the step still ran: after it, the thread's waits are
            # other steps'.
            starved = max(stall.waited_last - stall.waited_at_start, 0) / 1e9
        # Time the loop thread was runnable but the OS gave its CPU to others is not the step's
        # fault: on a saturated host, counting it would blame whatever line happened to run.
        duration = max(duration - starved, 0.0)
        if duration < self.settings.slow_callback_duration:
            return
        location = stall.main_location()
        # The task's name stays in the finding's ``task`` field only: names may be built from
        # request data, and the message travels to span events.
        what = f"task {stall.subject}" if stall.task else stall.subject
        message = (f"{what} blocked the event loop for {duration:.3f} s in one step "
                   "without awaiting")
        if description:
            message += f"; asyncio debug mode: Executing {description}"
        if starved >= 0.01:
            message += f" (plus {starved:.3f} s waiting for a CPU, not counted)"
        _findings.report(
            _names.SLOW_CALLBACK, message, stall.subject, location=location,
            duration=duration, task=stall.task,
            stack=_format_stack(stall.stacks[location]) if location in stall.stacks else (),
            span=stall.span,
        )
        if self.settings.record_slow is not None:
            self.settings.record_slow(duration)

    def _report_unmatched_exact(self, state: LoopState, now: float) -> None:
        """Steps asyncio's debug mode timed that no stall matched (too short for a sample)."""
        if state.stall is not None:
            return
        while state.exact and now - state.exact[0][0] > 2 * self.settings.poll:
            _, seconds, description = state.exact.popleft()
            _findings.report(
                _names.SLOW_CALLBACK,
                f"asyncio debug mode: Executing {description} took {seconds:.3f} s",
                subject_of(description), duration=seconds,
            )
            if self.settings.record_slow is not None:
                self.settings.record_slow(seconds)

    def _report_blocked(
        self, state: LoopState, stall: _Stall, snapshot: _Snapshot, blocked_for: float
    ) -> None:
        # The task's name stays in the finding's ``task`` field only: names may be built from
        # request data, and the message travels to span events.
        what = f"task {stall.subject}" if stall.task else stall.subject
        thread = _thread_name(state.thread_id)
        _findings.report(
            _names.LOOP_BLOCKED,
            f"the event loop in thread {thread!r} has been blocked for {blocked_for:.3f} s "
            f"and still is, running {what}",
            stall.subject, location=snapshot.location, duration=blocked_for, task=stall.task,
            stack=_format_stack(snapshot.stack), span=stall.span,
        )


def _runqueue_wait(native_id: int | None) -> int | None:
    """Nanoseconds thread ``native_id`` has spent runnable but waiting for a CPU (Linux), or
    None where the kernel does not tell. Read by the watchdog thread only: it is file I/O."""
    if native_id is None or not _SCHEDSTAT_AVAILABLE:
        return None
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", "rb") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


_SCHEDSTAT_AVAILABLE = sys.platform.startswith("linux")


def _thread_name(thread_id: int | None) -> str:
    for thread in threading.enumerate():
        if thread.ident == thread_id:
            return thread.name
    return str(thread_id)


def _span_of(task: asyncio.Task[Any]) -> Any:
    """The OpenTelemetry span current in ``task`` (3.12+: ``Task.get_context``), else None."""
    get_context = getattr(task, "get_context", None)
    if get_context is None:
        return None
    try:
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
        var = getattr(runtime, "_current_context", None)
        if not isinstance(var, contextvars.ContextVar):
            return None
        value = get_context().get(var)
        if value is None:
            return None
        span = trace.get_current_span(value)
        return span if span.get_span_context().is_valid else None
    except Exception:  # best effort: the finding is still reported without it
        return None


# The installed watchdog, read by ``LoopState.beat`` (a global read is cheaper than a reference
# per state, and lets a stale beat after uninstall do nothing).
_MONITOR: Watchdog | None = None


def set_current(watchdog: Watchdog | None) -> None:
    global _MONITOR
    _MONITOR = watchdog
