"""Instrumentation of the user's async context managers, async iterators and generators.

The component turns the configured targets into patches (see ``_targets``) and makes the
wrappers (``_proxies``) measure while it runs; ``stop`` restores every patch. The decorator
``asyncdiag.instrument`` works with or without an installed agent: a decorated class is
patched while an agent runs, and a decorated function returns exactly what the undecorated
one would while none does.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from . import _proxies, _safety, _targets
from ._patching import Patcher

if TYPE_CHECKING:
    from ._lifecycle import Agent

T = TypeVar("T")

logger = logging.getLogger("asyncdiag")

# Classes opted in with @asyncdiag.instrument: patched on every install, restored on uninstall.
_EXPLICIT_CLASSES: weakref.WeakSet[type] = weakref.WeakSet()
_ACTIVE: Instrumentation | None = None
_NOT_INSTRUMENTABLE = (
    "is not an async context manager class, an async iterator class, an async generator "
    "function or an @asynccontextmanager function"
)


class Instrumentation:
    name = "instrumentation"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._patcher = Patcher()
        self._active = False
        self._finder: _targets.GlobFinder | None = None
        self._warned: set[str] = set()
        self._exact: dict[str, list[_targets.Target]] = {}
        # Targets of a module still executing when we looked (the script that calls
        # install() before defining its classes, a package importing its own submodule):
        # applied again when a loop first runs, by when the module has finished.
        self._deferred: list[tuple[ModuleType, _targets.Target | None]] = []
        self._agent: Agent | None = None

    # -- component ------------------------------------------------------------------------
    def start(self, agent: Agent) -> None:
        global _ACTIVE
        _proxies.set_runtime(
            _proxies.Runtime(agent.telemetry, agent.config.slow_teardown_threshold))
        self._active = True
        self._agent = agent
        agent.loops.subscribe(on_run=self._retry_deferred)
        _ACTIVE = self
        for cls in list(_EXPLICIT_CLASSES):
            self.patch_class(cls)
        targets = [_targets.parse(text) for text in agent.config.instrument]
        for target in targets:
            if target.is_glob:
                continue
            if target.module not in sys.modules and not _targets.module_findable(target.module):
                self._warn(target.text, f"module {target.module!r} cannot be found; the "
                           "target is patched if the module is ever imported")
            self._exact.setdefault(target.module, []).append(target)
        globs = tuple(t.module for t in targets if t.is_glob)
        if self._exact or globs:
            _targets.ensure_wrapt_finder()
        pre_imported: list[ModuleType] = []
        if globs:
            self._finder = _targets.GlobFinder(globs, self._on_glob_import)
            sys.meta_path.insert(0, self._finder)
            for name, module in list(sys.modules.items()):
                if isinstance(module, ModuleType) and self._finder.matches(name):
                    pre_imported.append(module)
        originals: dict[int, Any] = {}
        for module_name in list(self._exact):
            if module_name in sys.modules:
                module = sys.modules[module_name]
                originals.update(self._apply_exact(module, defer=True))
            else:
                import wrapt

                wrapt.register_post_import_hook(self._on_exact_import, module_name)
        for module in pre_imported:
            originals.update(self._apply_glob(module, defer=True))
        if originals:
            self._patch_reexports(originals)

    def stop(self) -> None:
        global _ACTIVE
        runtime = _proxies.RUNTIME
        _proxies.set_runtime(None)
        if runtime is not None:
            _proxies.end_all_open(runtime)
        if self._agent is not None:
            self._agent.loops.unsubscribe(on_run=self._retry_deferred)
            self._agent = None
        with self._lock:
            self._active = False
            self._deferred.clear()
            if _ACTIVE is self:
                _ACTIVE = None
            finder, self._finder = self._finder, None
            if finder is not None:
                finder.active = False
                if finder in sys.meta_path:
                    sys.meta_path.remove(finder)
            left = self._patcher.restore_all()
            self._exact.clear()
        if left:
            logger.warning(
                "asyncdiag: %d instrumentation patch(es) were wrapped again by other code and "
                "were left in place, passing through: %s", len(left), ", ".join(left),
            )

    # -- patching -------------------------------------------------------------------------
    def patch_class(self, cls: type) -> None:
        with self._lock:
            if self._active and not _targets.is_patched_class(cls):
                _targets.patch_class(cls, self._patcher)

    def _patch(self, owner: Any, name: str, raw: Any, label: str) -> Any:
        """Instrument ``owner.name`` (whose raw value is ``raw``). Returns the original function
        that was replaced (for re-export patching), else None. One object that cannot be
        patched (a built-in type, a class refusing attribute writes) costs one warning, not
        the other targets."""
        try:
            return self._patch_one(owner, name, raw, label)
        except Exception as exc:
            self._warn(label, f"could not instrument {label}: {exc!r}; left as it is")
            return None

    def _patch_one(self, owner: Any, name: str, raw: Any, label: str) -> Any:
        kind = _targets.classify(raw)
        if kind is None:
            self._warn(label, f"{label} {_NOT_INSTRUMENTABLE}; ignored")
            return None
        if kind == _targets.ALREADY:
            return None
        if kind == _targets.CLASS:
            self.patch_class(raw)
            return None
        wrapper = _proxies.InstrumentedFunction(raw, _targets.site_of(raw), kind)
        with self._lock:
            if not self._active:
                return None
            self._patcher.set(owner, name, wrapper)
        return raw

    def _apply_exact(self, module: ModuleType, defer: bool = False) -> dict[int, Any]:
        """``defer``: the module was found in sys.modules at install, maybe still executing.
        (A post-import hook runs once the module's code has finished.)"""
        replaced: dict[int, Any] = {}
        for target in self._exact.get(module.__name__, []):
            assert target.qualname is not None
            try:
                owner, name, raw = _targets.resolve(module, target.qualname)
            except AttributeError:
                if defer and _still_executing(module) and (
                    module, target) not in self._deferred:
                    self._deferred.append((module, target))
                    continue
                self._warn(target.text, f"module {module.__name__!r} has no attribute "
                           f"{target.qualname!r}; target {target.text!r} ignored")
                continue
            original = self._patch(owner, name, raw, target.text)
            if original is not None:
                replaced[id(original)] = (original, replaced_by(owner, name))
        return replaced

    def _apply_glob(self, module: ModuleType, defer: bool = False) -> dict[int, Any]:
        replaced: dict[int, Any] = {}
        if defer and _still_executing(module) and (module, None) not in self._deferred:
            self._deferred.append((module, None))
        for owner, name, raw in _targets.defined_objects(module):
            if _targets.classify(raw) is None:
                continue
            original = self._patch(owner, name, raw, f"{module.__name__}:{name}")
            if original is not None:
                replaced[id(original)] = (original, replaced_by(owner, name))
        return replaced

    def _patch_reexports(
        self, replaced: dict[int, Any], modules: list[ModuleType] | None = None
    ) -> None:
        """Modules imported before install may hold a function under another name (``from
        .streams import paginated_stream as stream``): point those names at the wrapper too.
        A module imported later only needs its own aliases (``alias = rows``) fixed: modules
        that import from it run after its hook."""
        for module in list(sys.modules.values()) if modules is None else modules:
            if not isinstance(module, ModuleType):
                continue
            try:
                items = list(vars(module).items())
            except TypeError:
                continue
            for name, value in items:
                entry = replaced.get(id(value))
                if entry is not None and entry[0] is value:
                    with self._lock:
                        if self._active:
                            self._patcher.set(module, name, entry[1])

    # -- import hooks (run inside the importing thread, right after the module's code) -------
    def _on_exact_import(self, module: ModuleType) -> None:
        if not self._active:
            return
        try:
            replaced = self._apply_exact(module)
            if replaced:
                self._patch_reexports(replaced, [module])
        except Exception as exc:
            _safety.hook_failed("instrumentation import hook", exc)

    def _on_glob_import(self, module: ModuleType) -> None:
        if not self._active:
            return
        try:
            replaced = self._apply_glob(module)
            if replaced:
                self._patch_reexports(replaced, [module])
        except Exception as exc:
            _safety.hook_failed("instrumentation import hook", exc)

    def _retry_deferred(self, loop: object) -> None:
        if not self._deferred:
            return
        with self._lock:
            deferred, self._deferred = self._deferred, []
        try:
            for module, target in deferred:
                if target is None:
                    replaced = self._apply_glob(module)
                else:
                    replaced = self._apply_exact_target(module, target)
                if replaced:
                    self._patch_reexports(replaced, [module])
        except Exception as exc:
            _safety.hook_failed("instrumentation deferred targets", exc)

    def _apply_exact_target(
        self, module: ModuleType, target: _targets.Target
    ) -> dict[int, Any]:
        assert target.qualname is not None
        try:
            owner, name, raw = _targets.resolve(module, target.qualname)
        except AttributeError:
            self._warn(target.text, f"module {module.__name__!r} has no attribute "
                       f"{target.qualname!r}; target {target.text!r} ignored")
            return {}
        original = self._patch(owner, name, raw, target.text)
        return {id(original): (original, replaced_by(owner, name))} if original else {}

    def _warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning("asyncdiag: %s", message)


def _still_executing(module: ModuleType) -> bool:
    """The module's code is still running: it is being imported, or it is the script."""
    if module.__name__ == "__main__":
        return True
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def replaced_by(owner: Any, name: str) -> Any:
    return Patcher.raw(owner, name) if isinstance(owner, type) else getattr(owner, name)


def instrument(target: T) -> T:
    """``@asyncdiag.instrument``: see ``asyncdiag.instrument``."""
    try:
        kind = _targets.classify(target)
        if kind is None:
            label = getattr(target, "__qualname__", repr(target))
            logger.warning("asyncdiag: instrument(%s): it %s; left as it is", label,
                           _NOT_INSTRUMENTABLE)
            return target
        if kind == _targets.ALREADY:
            return target
        if kind == _targets.CLASS:
            assert isinstance(target, type)
            _EXPLICIT_CLASSES.add(target)
            active = _ACTIVE
            if active is not None:
                active.patch_class(target)
            return target
        wrapped: T = _proxies.InstrumentedFunction(target, _targets.site_of(target), kind)
        return wrapped
    except Exception as exc:
        _safety.hook_failed("asyncdiag.instrument", exc)
        return target
