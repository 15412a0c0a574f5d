"""Orphaned async generators: found through the asyncgen hooks, chained with the loop's own.

An async generator that is dropped unfinished and never closed has its ``finally`` blocks
(and the ``__aexit__`` of every ``async with`` inside it) run late, by the garbage collector
and the loop's finalizer hook, outside the task that used it -- or never, if the loop is
already closed. CPython tells exactly these generators apart: the finalizer captured at first
iteration is called only for a generator that is collected while started-or-created, not
exhausted, and not closed (``_PyGen_Finalize``: frame not completed and ``ag_closed`` unset;
``aclose()`` and ``contextlib.aclosing`` set ``ag_closed``). That finalizer is the detector.

Hooks are per thread and every event loop swaps its own in for as long as it runs
(``run_forever`` calls ``sys.set_asyncgen_hooks(loop hooks)`` and restores the previous ones
on exit; asyncio and uvloop both look ``sys.set_asyncgen_hooks`` up at call time). Hooks set
once at install would be bypassed by every loop, and replacing the loop's hooks would break
``loop.shutdown_asyncgens()``. So asyncdiag wraps ``sys.set_asyncgen_hooks`` and
``sys.get_asyncgen_hooks``: whoever sets hooks (a loop, the application, trio, another
library) gets a :class:`_Chain` installed in their place, whose hooks do asyncdiag's
bookkeeping and then call theirs; ``get`` answers what the caller set, so save/restore pairs
keep working and uninstall restores only what is still ours (the same chaining trio does for
foreign generators in ``trio/_core/_asyncgens.py``). A loop that set its hooks through a
reference it cached before install is re-chained at the start of its run (``on_run``).

Per generator, the first-iteration hook calls the hook it wraps, then records the code object
and instruction offset of the first frame outside asyncio/contextlib/asyncdiag (the ``async
for`` line; the line number is computed only if a finding is made) and the name of the current
task, in a dict keyed by ``id(agen)``. That hook runs once for every generator of the program,
so it does no more than that: whatever can wait is done when a finding is made or at prune.
Under asyncio's and uvloop's own hooks it is the C ``_speedups.FirstIterHook`` when the package
was built with a compiler (same steps, a third of the cost), else the Python closure here.
Liveness: asyncio's and uvloop's own firstiter hooks put every generator in the loop's weak set
(``loop._asyncgens``, which ``shutdown_asyncgens`` closes), so an entry made under one of those
hooks holds nothing and is alive while its generator is in that set; under any other hooks the
entry holds a weak reference (no callback). Entries are not removed at the generator's death:
CPython clears weak references (running their callbacks) *before* it calls the finalizer, which
still needs the entry; and generators die at a few reused addresses, so the next generator's
entry usually overwrites the dead one's. What is left is pruned in bulk, by C-level passes (no
Python frame per entry), once the dict has doubled since the last prune and at each metrics
collection (on the collecting thread: no timer on any loop, which a program could observe),
which also publishes ``asyncdiag.asyncgen.active`` (one telemetry call per prune, not two per
generator).
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import contextlib
import gc
import logging
import os
import sys
import threading
import types
import weakref
from collections import deque
from collections.abc import Callable
from itertools import compress, repeat
from operator import attrgetter, is_, itemgetter, methodcaller, not_
from types import AsyncGeneratorType, CodeType, FrameType
from typing import TYPE_CHECKING, Any

import wrapt
from opentelemetry import trace

from . import _findings, _loops, _names, _safety
from ._frames import code_location, is_own_machinery
from ._patching import Patcher

if TYPE_CHECKING:
    from ._lifecycle import Agent
    from ._speedups import FirstIterHook

# The first-iteration hook under a loop's own hooks, in C (``_speedups.c``), when the package
# was built with a compiler; otherwise, and under any other hooks, the Python closures of
# ``_Chain.make_firstiter`` (which the C version follows step for step).
_CFirstIterHook: type[FirstIterHook] | None
try:
    from ._speedups import FirstIterHook as _CFirstIterHook
except ImportError:  # built without a C compiler
    _CFirstIterHook = None

logger = logging.getLogger("asyncdiag")

AnyAsyncGen = AsyncGeneratorType[Any, Any]
Hook = Callable[[AnyAsyncGen], object]

# Entries of dead generators are pruned when the registry has doubled since the last prune
# (amortised O(1) per generator), never below this size, and on the periodic tick.
_MIN_PRUNE = 1024

_ASYNCIO_DIR = os.path.dirname(os.path.abspath(asyncio.__file__)) + os.sep
_CONTEXTLIB_FILE = os.path.abspath(contextlib.__file__)

_get_running_loop = _loops.running_loop
_current_task = _loops.task_of
_getframe = sys._getframe
_ref = weakref.ref
_ref_of = itemgetter(0)
_call = methodcaller("__call__")
_ag_frame: Callable[[Any], Any] = attrgetter("ag_frame")


def _live_ids(agens: weakref.WeakSet[Any]) -> set[int]:
    """The ids of the generators in a loop's weak set that are alive and unfinished.

    ``set.copy`` of the set's references is one C call, so a loop thread adding meanwhile
    cannot break it (iterating the WeakSet could: "Set changed size during iteration"), and
    each generator is dereferenced, tested and released inside one C-level pass.
    """
    refs = agens.data.copy()  # type: ignore[attr-defined]
    return set(map(id, filter(_ag_frame, filter(None, map(_call, refs)))))


def _is_infrastructure(filename: str) -> bool:
    """Frames of asyncio, contextlib and asyncdiag are not where the program iterated: an
    ``@asynccontextmanager`` generator is first iterated inside contextlib, on behalf of the
    user's ``async with`` line."""
    path = os.path.abspath(filename) if filename[:1] not in ("<", "") else filename
    return (is_own_machinery(path) or path.startswith(_ASYNCIO_DIR)
            or path == _CONTEXTLIB_FILE)


if sys.version_info >= (3, 12):

    def _started(agen: AnyAsyncGen) -> bool:
        """True if the generator's frame ran (is suspended); only asked of unfinished ones."""
        return bool(agen.ag_suspended)  # type: ignore[attr-defined]

elif sys.version_info >= (3, 11):
    import dis

    _RETURN_GENERATOR = dis.opmap["RETURN_GENERATOR"]

    def _started(agen: AnyAsyncGen) -> bool:
        # A created frame's last instruction is the RETURN_GENERATOR that made it.
        frame = agen.ag_frame
        if frame is None:
            return False
        lasti = frame.f_lasti
        return lasti >= 0 and agen.ag_code.co_code[lasti] != _RETURN_GENERATOR

else:

    def _started(agen: AnyAsyncGen) -> bool:
        frame = agen.ag_frame
        return frame is not None and frame.f_lasti != -1


# A hot orphaning site repeats the same generator function: its text is computed once.
# Bounded: cleared when full (code objects are kept alive).
_TEXT_CACHE_SIZE = 2048
_subjects: dict[tuple[CodeType, str, str], tuple[str, str]] = {}


def _subject(agen: AnyAsyncGen) -> tuple[str, str]:
    """The generator function's qualified name, and where it is defined."""
    code = agen.ag_code
    qualname = agen.__qualname__
    key = (code, code.co_filename, qualname)
    found = _subjects.get(key)
    if found is None:
        defined = code
        if is_own_machinery(code.co_filename):
            # asyncdiag's instrumentation proxy (an async generator driving the user's, under
            # the user's name): point at the user's generator function instead.
            inner = _wrapped_generator(agen)
            if inner is not None:
                defined = inner.ag_code
        if len(_subjects) >= _TEXT_CACHE_SIZE:
            _subjects.clear()
        found = _subjects[key] = (qualname, f"{defined.co_filename}:{defined.co_firstlineno}")
    return found


def _wrapped_generator(agen: AnyAsyncGen) -> AnyAsyncGen | None:
    frame = agen.ag_frame
    if frame is None:
        return None
    for value in frame.f_locals.values():
        if isinstance(value, types.AsyncGeneratorType) and value is not agen:
            return value
    return None


# Registry entry, keyed by ``id(agen)``: (weak reference to the generator, or None when the
# chain's loop keeps the generator in its own weak set; chain it was first iterated under;
# code and byte offset of the iterating frame; task name). A tuple: the cheapest record to
# build once per generator.
Entry = tuple["weakref.ref[AnyAsyncGen] | None", "_Chain", "CodeType | None", int, "str | None"]


def _loop_hook_functions() -> tuple[object, ...]:
    """The firstiter hook implementations known to add every generator to the loop's
    ``_asyncgens`` weak set (asyncio's, and uvloop's if uvloop is loaded: never imported
    here)."""
    known: list[object] = [
        asyncio.base_events.BaseEventLoop._asyncgen_firstiter_hook,  # type: ignore[attr-defined]
    ]
    uvloop_loop = sys.modules.get("uvloop.loop")
    uv_hook = getattr(getattr(uvloop_loop, "Loop", None), "_asyncgen_firstiter_hook", None)
    if uv_hook is not None:
        known.append(uv_hook)
    return tuple(known)


def _generators_set(
    loop: asyncio.AbstractEventLoop, first: Hook | None
) -> weakref.WeakSet[Any] | None:
    """The weak set in which ``loop`` keeps every generator its firstiter hook ``first`` saw,
    or None if ``first`` is not known to do that.

    asyncio's and uvloop's hooks add the generator to ``loop._asyncgens`` (a WeakSet that
    ``shutdown_asyncgens`` closes), and their finalizer hooks discard it. That set already
    answers "is this generator still alive?", so generators first iterated under these hooks
    need no weak reference of ours (creating it, and clearing it when the generator dies,
    was about a fifth of the hook's cost). uvloop declares the set as a C-level attribute,
    invisible to ``getattr``: it is found among the loop's referents, and only if it is the
    only WeakSet there.
    """
    if getattr(first, "__self__", None) is not loop:
        return None
    if getattr(first, "__func__", None) not in _loop_hook_functions():
        return None
    found = getattr(loop, "_asyncgens", None)
    if isinstance(found, weakref.WeakSet):
        return found
    candidates = [r for r in gc.get_referents(loop) if type(r) is weakref.WeakSet]
    return candidates[0] if len(candidates) == 1 else None


class _Chain:
    """One pair of hooks somebody set, with asyncdiag's bookkeeping in front of them.

    Installed as the thread's hooks (``firstiter=chain.make_firstiter(),
    finalizer=chain.finalizer``) in place of ``(first, fin)``. A generator keeps the finalizer
    it captured at first iteration, so a chain lives as long as the generators first iterated
    under it, exactly as the wrapped hooks would have; after uninstall it passes calls through.
    """

    __slots__ = ("__weakref__", "agens", "fin", "first", "loop", "tracker")

    def __init__(self, tracker: AsyncgenTracker, first: Hook | None, fin: Hook) -> None:
        self.tracker = tracker
        self.first = first
        self.fin = fin
        # The loop whose shutdown_asyncgens() will close generators first iterated under this
        # chain: the one whose firstiter hook we call.
        owner = getattr(first, "__self__", None)
        self.loop = owner if isinstance(owner, asyncio.AbstractEventLoop) else None
        # The loop's own weak set of its generators, when its hook keeps one (see
        # _generators_set): entries then hold no weak reference.
        self.agens = _generators_set(self.loop, first) if self.loop is not None else None

    def make_firstiter(self) -> Hook:
        """The first-iteration hook: a closure, because it runs once for every generator of
        the program and cell loads are cheaper than attribute loads on ``self``.

        The hook it wraps is called first: the generator is then in the loop's weak set before
        its entry exists, so a prune (here, or on the metrics thread) never takes a fresh
        entry for a dead one; and if that hook raises, the exception reaches the iterating
        code as it would have, with nothing recorded.
        """
        chain = self
        tracker = self.tracker
        registry = tracker.registry
        skip_get = tracker.skip_cache.get
        first = self.first
        chain_loop = self.loop
        # The last code object found to be the program's (not asyncio's, contextlib's or
        # ours): a hot call site then skips the file-name lookup. Code objects are immortal
        # in practice, so holding one keeps nothing else alive.
        user_code: CodeType | None = None

        if self.agens is not None and first is not None and chain_loop is not None:
            if _CFirstIterHook is not None:
                return _CFirstIterHook(
                    first=first, tracker=tracker, registry=registry,
                    skip_cache=tracker.skip_cache, chain=chain, loop=chain_loop,
                    current_task=_loops.TASK_SOURCE,
                )
            loop = chain_loop

            def firstiter(
                agen: AnyAsyncGen,
                _getframe: Callable[[int], FrameType] = _getframe,
                _id: Callable[[object], int] = id,
                _len: Callable[[dict[int, Entry]], int] = len,
            ) -> None:
                nonlocal user_code
                first(agen)
                if tracker.enabled:
                    try:
                        code: CodeType | None
                        try:
                            frame = _getframe(1)
                        except ValueError:  # iterated from C code with no Python frame
                            code, lasti = None, -1
                        else:
                            code = frame.f_code
                            if code is user_code:
                                lasti = frame.f_lasti
                            elif skip_get(code.co_filename) is False:
                                user_code = code
                                lasti = frame.f_lasti
                            else:
                                code, lasti = tracker.locate(frame)
                        task = _current_task(loop)
                        registry[_id(agen)] = (
                            None, chain, code, lasti,
                            task.get_name() if task is not None else None,
                        )
                        if _len(registry) >= tracker.prune_at:
                            tracker.prune()
                    except Exception as exc:
                        tracker.failed(exc)

        else:

            def firstiter(
                agen: AnyAsyncGen,
                _getframe: Callable[[int], FrameType] = _getframe,
                _id: Callable[[object], int] = id,
                _len: Callable[[dict[int, Entry]], int] = len,
            ) -> None:
                # Exactly the call the thread would have made without asyncdiag.
                if first is not None:
                    first(agen)
                if tracker.enabled:
                    try:
                        code: CodeType | None
                        try:
                            frame = _getframe(1)
                        except ValueError:
                            code, lasti = None, -1
                        else:
                            code = frame.f_code
                            if skip_get(code.co_filename) is False:
                                lasti = frame.f_lasti
                            else:
                                code, lasti = tracker.locate(frame)
                        # The loop whose hooks these are is the running one.
                        loop = chain_loop if chain_loop is not None else _get_running_loop()
                        task = _current_task(loop) if loop is not None else None
                        registry[_id(agen)] = (
                            _ref(agen), chain, code, lasti,
                            task.get_name() if task is not None else None,
                        )
                        if _len(registry) >= tracker.prune_at:
                            tracker.prune()
                    except Exception as exc:
                        tracker.failed(exc)

        firstiter._asyncdiag_chain = chain  # type: ignore[attr-defined]
        return firstiter

    def finalizer(self, agen: AnyAsyncGen) -> None:
        tracker = self.tracker
        if tracker.enabled:
            try:
                tracker.collected_unfinished(agen)
            except Exception as exc:
                tracker.failed(exc)
        self.fin(agen)


def _chain_of(hook: object) -> _Chain | None:
    """The chain behind one of our hooks (a firstiter closure or a bound finalizer)."""
    owner = getattr(hook, "_asyncdiag_chain", None)
    if owner is None:
        owner = getattr(hook, "__self__", None)
    return owner if type(owner) is _Chain else None


class AsyncgenTracker:
    name = "asyncgen tracker"

    def __init__(self) -> None:
        # ``active``: the sys wrappers chain and unwrap hooks (from start to stop);
        # ``enabled``: generators are tracked (off after stop, or after an internal failure).
        self.active = False
        self.enabled = False
        self.registry: dict[int, Entry] = {}
        self.prune_at = _MIN_PRUNE
        self.skip_cache: dict[str, bool] = {}
        self._agent: Agent | None = None
        self._patcher = Patcher()
        self._lock = threading.RLock()
        self._orig_get: Callable[[], Any] = sys.get_asyncgen_hooks
        self._orig_set: Callable[..., None] = sys.set_asyncgen_hooks
        self._hooks_type: Callable[[tuple[Any, Any]], Any] = type(sys.get_asyncgen_hooks())
        self._patched_owners: set[type] = set()
        self._reported_active = 0
        self._publish_lock = threading.Lock()

    # -- component ----------------------------------------------------------------------
    def start(self, agent: Agent) -> None:
        self._agent = agent
        self._orig_get = sys.get_asyncgen_hooks
        self._orig_set = sys.set_asyncgen_hooks
        self._hooks_type = type(self._orig_get())
        self.active = self.enabled = True
        self._patcher.set(sys, "set_asyncgen_hooks", self._make_set())
        self._patcher.set(sys, "get_asyncgen_hooks", self._make_get())
        # The installing thread may already have hooks (a running loop, the application's):
        # chain them now rather than at their next set.
        self._rechain()
        agent.loops.subscribe(on_loop=self._on_loop, on_run=self._on_run)
        set_refresher = getattr(agent.telemetry, "set_asyncgen_refresher", None)
        if set_refresher is not None:
            set_refresher(self.refresh)

    def stop(self) -> None:
        with self._lock:
            self.enabled = False
            agent, self._agent = self._agent, None
            try:
                if agent is not None:
                    agent.loops.unsubscribe(on_loop=self._on_loop, on_run=self._on_run)
                    set_refresher = getattr(agent.telemetry, "set_asyncgen_refresher", None)
                    if set_refresher is not None:
                        set_refresher(None)
                # Only this thread's hooks can be restored; chains left in other threads
                # pass calls through until those threads set their hooks again (every loop
                # does when its run ends).
                raw = self._orig_get()
                theirs = self._unwrap(raw)
                if theirs is not raw:
                    self._orig_set(theirs.firstiter, theirs.finalizer)
            finally:
                self.active = False
                self._patcher.restore_all()
                self._patched_owners.clear()
                self._reset_registry()
                if agent is not None and self._reported_active:
                    # The up-down counter goes back to where install found it.
                    self._add_active(agent, -self._reported_active)
                self._reported_active = 0

    # -- hook plumbing ------------------------------------------------------------------
    def _unwrap(self, raw: Any) -> Any:
        """The hooks as whoever set them sees them: our chains replaced by what they wrap."""
        first_chain = _chain_of(raw.firstiter)
        fin_chain = _chain_of(raw.finalizer)
        if first_chain is None and fin_chain is None:
            return raw
        first = first_chain.first if first_chain is not None else raw.firstiter
        fin = fin_chain.fin if fin_chain is not None else raw.finalizer
        return self._hooks_type((first, fin))

    def _install(self, first: Hook | None, fin: Hook | None) -> None:
        """Make ``(first, fin)`` this thread's hooks, behind a chain when there is a finalizer.

        Without a finalizer CPython closes a collected generator itself, synchronously;
        installing ours would change that, so such hooks are set as they are (and their
        generators are not tracked: no loop runs them).
        """
        # Hooks obtained raw (through a reference to the original get cached before install)
        # may be our own chain's: chain what they wrap, never a chain (two reports per orphan).
        first_chain, fin_chain = _chain_of(first), _chain_of(fin)
        if first_chain is not None:
            first = first_chain.first
        if fin_chain is not None:
            fin = fin_chain.fin
        if fin is None or not self.enabled:
            self._orig_set(firstiter=first, finalizer=fin)
            return
        chain = _Chain(self, first, fin)
        if chain.loop is not None:
            # Here rather than only on loop discovery: a loop made by a factory looked up
            # before install is never announced, but it always sets its hooks.
            self._patch_shutdown(type(chain.loop))
        self._orig_set(firstiter=chain.make_firstiter(), finalizer=chain.finalizer)

    def _rechain(self) -> None:
        """Put this thread's current hooks behind a chain of ours unless they already are."""
        raw = self._orig_get()
        first_chain = _chain_of(raw.firstiter)
        fin_chain = _chain_of(raw.finalizer)
        if (first_chain is not None and first_chain is fin_chain
                and first_chain.tracker is self):
            return
        if raw.finalizer is None and first_chain is None:
            return
        theirs = self._unwrap(raw)
        self._install(theirs.firstiter, theirs.finalizer)

    def _make_get(self) -> Callable[[], Any]:
        orig_get = self._orig_get

        def get_asyncgen_hooks() -> Any:
            hooks = orig_get()
            if not self.active:
                return hooks
            try:
                return self._unwrap(hooks)
            except Exception as exc:
                self.failed(exc)
                return hooks

        get_asyncgen_hooks.__doc__ = orig_get.__doc__
        return get_asyncgen_hooks

    def _make_set(self) -> Callable[..., None]:
        orig_set = self._orig_set
        orig_get = self._orig_get

        def set_asyncgen_hooks(*args: Any, **kwargs: Any) -> None:
            if not self.active:
                return orig_set(*args, **kwargs)
            try:
                before = self._unwrap(orig_get())
            except Exception as exc:
                self.failed(exc)
                return orig_set(*args, **kwargs)
            # The original validates the arguments and raises exactly its own errors; what it
            # installed is then put behind a chain.
            orig_set(*args, **kwargs)
            try:
                raw = orig_get()
                given_first = len(args) > 0 or "firstiter" in kwargs
                given_fin = len(args) > 1 or "finalizer" in kwargs
                first = raw.firstiter if given_first else before.firstiter
                fin = raw.finalizer if given_fin else before.finalizer
                self._install(first, fin)
                # Every asyncio and uvloop run_forever starts by setting its own hooks here,
                # whatever way the loop was created (a factory captured before install, a
                # loop never set as current): the one place every loop shows up.
                owner = getattr(first, "__self__", None)
                agent = self._agent
                if agent is not None and isinstance(owner, asyncio.AbstractEventLoop):
                    agent.loops.discover(owner)
            except Exception as exc:
                self.failed(exc)
            return None

        set_asyncgen_hooks.__doc__ = orig_set.__doc__
        return set_asyncgen_hooks

    # -- loops --------------------------------------------------------------------------
    def _on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._patch_shutdown(type(loop))

    def _on_run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Inside the loop thread, at the start of a run: chain hooks the loop set through a
        cached ``sys.set_asyncgen_hooks`` (bypassing our wrapper)."""
        if self.enabled:
            self._rechain()

    def _patch_shutdown(self, loop_type: type) -> None:
        """Wrap ``shutdown_asyncgens`` where the loop class defines it (a Python class), or on
        the loop's own class when it is inherited from an extension type (uvloop)."""
        with self._lock:
            if not self.enabled:
                return
            owner: type | None = None
            for klass in loop_type.__mro__:
                if "shutdown_asyncgens" in vars(klass):
                    owner = klass
                    break
            if owner is None:
                return
            if not owner.__flags__ & (1 << 9):  # Py_TPFLAGS_HEAPTYPE: C types are read-only
                owner = loop_type
                if not owner.__flags__ & (1 << 9):
                    return
            if owner in self._patched_owners:
                return
            original = owner.shutdown_asyncgens  # type: ignore[attr-defined]
            wrapper = wrapt.FunctionWrapper(original, self._wrap_shutdown)
            self._patcher.set(owner, "shutdown_asyncgens", wrapper)
            self._patched_owners.add(owner)

    def _wrap_shutdown(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        if self.enabled and instance is not None:
            try:
                self._report_alive_at_shutdown(instance)
            except Exception as exc:
                self.failed(exc)
        return wrapped(*args, **kwargs)

    # -- bookkeeping ----------------------------------------------------------------------
    def failed(self, exc: BaseException) -> None:
        """An internal error: tracking stops for good (hooks keep chaining, so the program
        and the loop's own hooks are unaffected), logged once."""
        self.enabled = False
        _safety.hook_failed(self.name, exc)

    def _reset_registry(self) -> None:
        self.registry = {}
        self.prune_at = _MIN_PRUNE

    def locate(self, frame: FrameType) -> tuple[CodeType, int]:
        """The first frame that is the program's, not asyncio's, contextlib's or ours (the
        slow path: a file seen for the first time, or iteration driven by such a frame)."""
        skip = self.skip_cache
        walk: FrameType | None = frame
        while walk is not None:
            filename = walk.f_code.co_filename
            infra = skip.get(filename)
            if infra is None:
                infra = skip[filename] = _is_infrastructure(filename)
            if not infra:
                return walk.f_code, walk.f_lasti
            walk = walk.f_back
        return frame.f_code, frame.f_lasti

    def prune(self) -> None:
        """Drop the entries of collected or finished generators, publish the active count.

        No generator is held across Python bytecodes here (this also runs on the metrics
        thread): were the last reference to one ours, its finalizer would run in this thread.
        Liveness is read in C-level passes, and an entry is removed only if it is still the
        one classified (a key re-registered meanwhile for a new generator keeps its entry).
        """
        registry = self.registry
        keys = list(registry)
        entries = list(map(registry.get, keys, repeat(None)))
        ref_keys: list[int] = []
        ref_entries: list[Entry] = []
        doomed_keys: list[int] = []
        doomed_entries: list[Entry] = []
        by_set: dict[int, tuple[weakref.WeakSet[Any], list[int], list[Entry]]] = {}
        for key, entry in zip(keys, entries, strict=True):
            if entry is None:
                continue
            if entry[0] is not None:
                ref_keys.append(key)
                ref_entries.append(entry)
                continue
            agens = entry[1].agens
            if agens is None:  # cannot happen (such chains hold references): never kept blind
                doomed_keys.append(key)
                doomed_entries.append(entry)
                continue
            group = by_set.get(id(agens))
            if group is None:
                group = by_set[id(agens)] = (agens, [], [])
            group[1].append(key)
            group[2].append(entry)
        # Entries holding a weak reference: dead (None) or finished (ag_frame None).
        dead = list(map(not_, map(getattr, map(_call, map(_ref_of, ref_entries)),
                                  repeat("ag_frame"), repeat(None))))
        doomed_keys += compress(ref_keys, dead)
        doomed_entries += compress(ref_entries, dead)
        # Entries of a loop's generators: alive while in the loop's weak set and unfinished.
        for agens, group_keys, group_entries in by_set.values():
            live = _live_ids(agens)
            gone = [key not in live for key in group_keys]
            doomed_keys += compress(group_keys, gone)
            doomed_entries += compress(group_entries, gone)
        # Each entry is read and popped inside the same C loop, where no other thread runs.
        deque(
            map(registry.pop,
                compress(doomed_keys, map(is_, map(registry.get, doomed_keys), doomed_entries)),
                repeat(None)),
            maxlen=0,
        )
        live_count = len(registry)
        self.prune_at = max(2 * live_count, _MIN_PRUNE)
        self._publish_active(live_count)

    def _publish_active(self, live: int) -> None:
        # Prunes run on loop threads and on the metrics collecting thread.
        with self._publish_lock:
            agent = self._agent
            delta = live - self._reported_active
            if agent is None or not delta:
                return
            self._reported_active = live
            self._add_active(agent, delta)

    def refresh(self) -> None:
        """Bring ``asyncdiag.asyncgen.active`` up to date; the telemetry calls this at each
        metrics collection, on its collecting thread (so no timer runs on any loop)."""
        if self.enabled:
            try:
                self.prune()
            except Exception as exc:
                self.failed(exc)

    @staticmethod
    def _add_active(agent: Agent, delta: int) -> None:
        try:
            agent.telemetry.asyncgen_active(delta)
        except Exception as exc:
            _safety.hook_failed("asyncgen active metric", exc)

    def collected_unfinished(self, agen: AnyAsyncGen) -> None:
        """The finalizer hook: ``agen`` is being collected, not exhausted and not closed."""
        entry = self.registry.pop(id(agen), None)
        if entry is None or not _started(agen):
            # Untracked (first iterated before install), or only an ``__anext__()`` /
            # ``aclose()`` awaitable was made and dropped: the body never ran.
            return
        _report_orphan(
            agen, entry,
            "was garbage-collected before it finished and was never closed, so its cleanup "
            "(finally blocks, async with exits) runs late, outside the task that used it, or "
            "never",
        )

    def _report_alive_at_shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        """``loop.shutdown_asyncgens()`` is about to close whatever the program left open.

        Runs in the loop's thread, which shutdown_asyncgens() itself then holds all these
        generators strongly from, so holding them here changes nothing.
        """
        registry = self.registry
        in_sets: dict[int, dict[int, AnyAsyncGen]] = {}
        for key in list(registry):
            entry = registry.get(key)
            if entry is None or entry[1].loop is not loop:
                continue
            ref = entry[0]
            if ref is None:
                agens = entry[1].agens
                members = in_sets.get(id(agens))
                if members is None:
                    members = in_sets[id(agens)] = {id(a): a for a in list(agens or ())}
                agen = members.get(key)
            else:
                agen = ref()
            if agen is None or agen.ag_frame is None:
                continue
            # A generator still inside __anext__ is being iterated by a pending task (aclose
            # will fail on it); a created one never ran: neither was left open by the program.
            if agen.ag_running or not _started(agen):
                continue
            # Alive, so no other generator can have taken its key meanwhile.
            if registry.pop(key, None) is None:
                continue
            _report_orphan(
                agen, entry,
                "was still open when the event loop shut down: it was closed by "
                "loop.shutdown_asyncgens(), not by the program, so its cleanup ran late, "
                "outside the task that used it",
            )


def _report_orphan(agen: AnyAsyncGen, entry: Entry, what_happened: str) -> None:
    _, _, code, lasti, task = entry
    subject, defined = _subject(agen)
    _findings.report(
        _names.ORPHANED_ASYNCGEN,
        f"async generator {subject} (defined at {defined}) {what_happened}; close it with "
        "aclose() or iterate it under contextlib.aclosing()",
        subject,
        location=code_location(code, lasti),
        task=task,
        span=_no_span(),
    )


def _no_span() -> Any:
    # Findings made by the garbage collector or at loop shutdown belong to no request: the
    # span current at that moment is unrelated, so the finding is not attached to it.
    return trace.INVALID_SPAN
