"""Attribute patches that can be undone exactly, in reverse order, and only where still ours.

Restoring blindly would clobber whoever wrapped our patch after us (another agent, a test
double); so a patch is restored only if the attribute still holds what we put there. If
somebody stacked on top of us, our object stays in place and is told to pass through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("asyncdiag")

_MISSING: Any = object()


@dataclass
class _Patch:
    owner: Any
    name: str
    original: Any  # the raw __dict__ entry (keeps staticmethod/classmethod wrappers), or _MISSING
    replacement: Any


class Patcher:
    def __init__(self) -> None:
        self._patches: list[_Patch] = []

    def __len__(self) -> int:
        return len(self._patches)

    @staticmethod
    def raw(owner: Any, name: str) -> Any:
        """The attribute as stored on ``owner`` itself (not inherited, not bound)."""
        try:
            return vars(owner).get(name, _MISSING)
        except TypeError:  # objects without __dict__
            return getattr(owner, name, _MISSING)

    def set(self, owner: Any, name: str, replacement: Any) -> Any:
        """Set ``owner.name = replacement``; return the raw original (or MISSING)."""
        original = self.raw(owner, name)
        setattr(owner, name, replacement)
        self._patches.append(_Patch(owner, name, original, replacement))
        return original

    def restore_all(self) -> list[str]:
        """Undo every patch in reverse order. Returns the names that could not be restored."""
        left_in_place: list[str] = []
        while self._patches:
            patch = self._patches.pop()
            label = f"{getattr(patch.owner, '__qualname__', patch.owner)!s}.{patch.name}"
            try:
                current = self.raw(patch.owner, patch.name)
                if current is not patch.replacement:
                    # Someone patched on top of us; pulling our layer out from under them
                    # would break their chain. Neutralise ours instead.
                    disable = getattr(patch.replacement, "_self_disable", None)
                    if callable(disable):
                        disable()
                    left_in_place.append(label)
                    continue
                if patch.original is _MISSING:
                    delattr(patch.owner, patch.name)
                else:
                    setattr(patch.owner, patch.name, patch.original)
            except Exception:
                logger.warning("asyncdiag: could not restore %s", label, exc_info=True)
                left_in_place.append(label)
        return left_in_place


MISSING = _MISSING
