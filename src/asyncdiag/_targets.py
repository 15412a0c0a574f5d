"""Instrumentation targets: parsing, classification, and import-time patching.

A target is ``module:Qualname`` (one object) or a glob on module names (``myapp.*``) that
selects every instrumentable object *defined* in matching modules (``obj.__module__`` is the
module: re-exports are instrumented where they are defined, not twice). Patching happens when
the module is imported, before or after ``install()``: wrapt's post-import hooks fire right
after the module's code ran (or at once for a module already imported); for globs a small
meta path finder, placed in front of wrapt's, registers such a hook for each matching module
name as it is imported.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import inspect
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import wrapt

from ._patching import MISSING, Patcher
from ._proxies import InstrumentedFunction, Site, make_anext, make_cm_methods


async def _sample_agen() -> AsyncIterator[None]:
    yield None


# Every @asynccontextmanager function is contextlib's ``helper`` closure: same code object.
_ACM_CODE = contextlib.asynccontextmanager(_sample_agen).__code__

CLASS = "class"
ASYNCGEN = "asyncgen"
ACM = "acm"
ALREADY = "instrumented"


@dataclass(frozen=True)
class Target:
    text: str
    module: str  # module name, or the glob pattern for globs
    qualname: str | None  # None for globs

    @property
    def is_glob(self) -> bool:
        return self.qualname is None


def parse(text: str) -> Target:
    if ":" in text:
        module, _, qualname = text.partition(":")
        return Target(text, module, qualname)
    return Target(text, text, None)


def _function_of(obj: Any) -> Any:
    if isinstance(obj, (classmethod, staticmethod)):
        return obj.__func__
    return obj


def classify(obj: Any) -> str | None:
    """What kind of instrumentable object ``obj`` is, or None."""
    func = _function_of(obj)
    if isinstance(func, InstrumentedFunction) or isinstance(obj, InstrumentedFunction):
        return ALREADY
    if inspect.isclass(obj):
        is_cm = hasattr(obj, "__aenter__") and hasattr(obj, "__aexit__")
        is_iterator = hasattr(obj, "__anext__")
        return CLASS if is_cm or is_iterator else None
    if inspect.isasyncgenfunction(func):
        return ASYNCGEN
    if getattr(func, "__code__", None) is _ACM_CODE and callable(func):
        return ACM
    return None


def site_of(obj: Any) -> Site:
    func = _function_of(obj)
    module = getattr(func, "__module__", None) or ""
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return Site.of(module, str(qualname or repr(func)))


def _raw_from_mro(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        raw = Patcher.raw(klass, name)
        if raw is not MISSING:
            return raw
    return MISSING


def _caller_for(raw: Any) -> Callable[..., Any]:
    """A callable ``(self, *args)`` that calls the raw class attribute as ``async with`` would
    (plain functions directly; any other descriptor bound to ``self`` first)."""
    if inspect.isfunction(raw):
        return raw  # type: ignore[no-any-return]
    getter = getattr(type(raw), "__get__", None)
    if getter is not None:
        return lambda self, *a, **k: getter(raw, self, type(self))(*a, **k)
    return lambda self, *a, **k: raw(*a, **k)


def _is_ours(raw: Any) -> bool:
    return bool(getattr(raw, "__asyncdiag_instrumented__", False))


def patch_class(cls: type, patcher: Patcher) -> bool:
    """Patch ``cls``'s async dunders on the class itself. False if nothing was patched."""
    site = Site.of(getattr(cls, "__module__", "") or "", cls.__qualname__)
    patched = False
    enter = _raw_from_mro(cls, "__aenter__")
    leave = _raw_from_mro(cls, "__aexit__")
    if enter is not MISSING and leave is not MISSING and not (
        _is_ours(Patcher.raw(cls, "__aenter__")) and _is_ours(Patcher.raw(cls, "__aexit__"))
    ):
        aenter, aexit = make_cm_methods(
            site, _caller_for(enter), _caller_for(leave), owner=cls
        )
        patcher.set(cls, "__aenter__", aenter)
        patcher.set(cls, "__aexit__", aexit)
        patched = True
    step = _raw_from_mro(cls, "__anext__")
    if step is not MISSING and not _is_ours(Patcher.raw(cls, "__anext__")):
        patcher.set(cls, "__anext__", make_anext(site, _caller_for(step)))
        patched = True
    return patched


def is_patched_class(cls: type) -> bool:
    return any(_is_ours(Patcher.raw(cls, name)) for name in ("__aenter__", "__anext__"))


def defined_objects(module: ModuleType) -> Iterable[tuple[Any, str, Any]]:
    """``(owner, attribute name, raw object)`` for each instrumentable object defined in
    ``module``: its top-level classes and functions, and methods of its top-level classes."""
    name = module.__name__
    for attr, obj in list(vars(module).items()):
        func = _function_of(obj)
        if getattr(func, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            if obj.__qualname__ != attr:
                continue  # an alias of a class defined under another name
            yield module, attr, obj
            for method_name, raw in list(vars(obj).items()):
                if method_name.startswith("__") and method_name.endswith("__"):
                    continue
                if classify(raw) in (ASYNCGEN, ACM) and getattr(
                    _function_of(raw), "__module__", None
                ) == name:
                    yield obj, method_name, raw
        elif getattr(func, "__name__", None) == attr:
            yield module, attr, obj


def resolve(module: ModuleType, qualname: str) -> tuple[Any, str, Any]:
    """``(owner, attribute name, raw object)`` for ``module:qualname``; raises AttributeError."""
    owner: Any = module
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    name = parts[-1]
    raw = Patcher.raw(owner, name) if inspect.isclass(owner) else getattr(owner, name)
    if raw is MISSING:
        raw = getattr(owner, name)  # inherited: patch on the named class all the same
    return owner, name, raw


class GlobFinder:
    """Registers a wrapt post-import hook for every module matching a glob, as it is imported.

    It never finds anything itself (``find_spec`` returns None); wrapt's finder, which comes
    after it in ``sys.meta_path``, then wraps the real loader and calls the hook once the
    module's code has run.
    """

    def __init__(self, patterns: tuple[str, ...], hook: Callable[[ModuleType], None]) -> None:
        self.patterns = patterns
        self.hook = hook
        self.active = True
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def matches(self, fullname: str) -> bool:
        return any(glob_matches(p, fullname) for p in self.patterns)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if not self.active or not self.matches(fullname):
            return None
        with self._lock:
            if fullname in self._seen:
                return None
            self._seen.add(fullname)
        if fullname not in sys.modules:
            wrapt.register_post_import_hook(self.hook, fullname)
        return None

    def invalidate_caches(self) -> None:
        pass


def glob_matches(pattern: str, module: str) -> bool:
    """fnmatch on the module name; ``pkg.*`` also selects ``pkg`` itself (the package's
    ``__init__``), which is what "the whole package" means to a user."""
    if fnmatch.fnmatchcase(module, pattern):
        return True
    return pattern.endswith(".*") and fnmatch.fnmatchcase(module, pattern[:-2])


def ensure_wrapt_finder() -> None:
    """wrapt installs its finder on its first hook registration; registering a no-op hook on
    a module that is already imported does that and calls the hook at once."""
    wrapt.register_post_import_hook(lambda module: None, __name__)


def module_findable(name: str) -> bool:
    """Whether the top-level package of ``name`` exists (without importing anything)."""
    top = name.split(".", 1)[0]
    if top in sys.modules:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False
