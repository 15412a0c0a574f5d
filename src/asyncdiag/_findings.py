"""Findings: the record, folding of repeats, the bounded store, and delivery.

Detectors only call :func:`report`. This module folds repeats by kind and location (a mistake
repeated a million times is one finding with ``count == 1_000_000``), keeps a bounded store
behind ``asyncdiag.findings()``, and delivers each finding to the ``asyncdiag`` logger and to
the telemetry sinks the agent registered (span event, ``asyncdiag.findings`` counter).

``report`` may be called from any thread and from inside garbage-collector finalizers, so it
takes only a re-entrant lock and never lets an exception out.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from . import _names, _safety

logger = logging.getLogger("asyncdiag")

# Distinct (kind, location) keys kept; past this the oldest-seen key is evicted and counted.
MAX_DISTINCT_FINDINGS = 1000
# Repeats are logged again only at these counts, so a hot mistake stays visible but cheap.
_RELOG_AT = frozenset(10**n for n in range(1, 10))


@dataclasses.dataclass(slots=True)
class Finding:
    """One detected async mistake, folded over its repeats.

    ``kind`` is one of the contract's stable strings; ``location`` is ``path:line`` or
    ``None``; ``duration`` is in seconds (the longest seen, for folded repeats); ``count`` is
    how many times this kind was seen at this location. ``asyncdiag.findings()`` returns
    copies: changing one does not change the store.
    """

    kind: str
    message: str
    subject: str
    location: str | None = None
    duration: float | None = None
    task: str | None = None
    count: int = 1
    stack: tuple[str, ...] = ()
    first_seen: float = dataclasses.field(default_factory=time.time)
    last_seen: float = dataclasses.field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, str]:
        location = self.location
        return (self.kind, location if location is not None else "?" + self.subject)

    def describe(self) -> str:
        parts = [f"[{self.kind}] {self.message}"]
        if self.location:
            parts.append(f"at {self.location}")
        if self.task:
            parts.append(f"in task {self.task!r}")
        if self.duration is not None:
            parts.append(f"({_format_duration(self.duration)})")
        if self.count > 1:
            parts.append(f"x{self.count}")
        return " ".join(parts)


def _format_duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.001:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


FindingSink = Callable[[Finding, Any], None]
"""Called once per report (folded or not) with the finding and the span it belongs to (or
``None`` for "the current span"). Sinks are telemetry deliveries: span event, counter."""


class FindingStore:
    def __init__(self, max_distinct: int = MAX_DISTINCT_FINDINGS) -> None:
        self._lock = threading.RLock()
        self._by_key: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._max_distinct = max_distinct
        self.evicted = 0
        self._sinks: list[FindingSink] = []
        self._listeners: list[Callable[[Finding], None]] = []

    # -- sinks and listeners -------------------------------------------------------------
    def add_sink(self, sink: FindingSink) -> None:
        with self._lock:
            self._sinks = [*self._sinks, sink]

    def remove_sink(self, sink: FindingSink) -> None:
        with self._lock:
            self._sinks = [s for s in self._sinks if s != sink]

    def add_listener(self, listener: Callable[[Finding], None]) -> None:
        """``listener`` sees every report (after folding); used by the pytest plugin and
        ``asyncdiag.testing`` to attribute findings to a test or a block."""
        with self._lock:
            self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Callable[[Finding], None]) -> None:
        with self._lock:
            self._listeners = [x for x in self._listeners if x != listener]

    # -- the store -----------------------------------------------------------------------
    def add(self, finding: Finding, span: Any = None) -> int:
        """Fold ``finding`` into the store and deliver it; returns the folded count."""
        key = finding.key
        with self._lock:
            entry = self._by_key.get(key)
            if entry is None:
                if len(self._by_key) >= self._max_distinct:
                    self._by_key.popitem(last=False)
                    self.evicted += 1
                entry = self._by_key[key] = _Entry(finding)
            else:
                entry.fold(finding)
                self._by_key.move_to_end(key)
            count = entry.count
            sinks = self._sinks
            listeners = self._listeners
        if count == 1 or count in _RELOG_AT:
            _log(entry.freeze())
        for sink in sinks:
            _safety.call_safely(f"finding sink {getattr(sink, '__qualname__', sink)!s}", sink,
                         finding, span)
        for listener in listeners:
            # Named per listener: one failing listener must not silence the others.
            _safety.call_safely(f"finding listener {getattr(listener, '__qualname__', listener)!s}",
                         listener, finding)
        return count

    def snapshot(self) -> list[Finding]:
        with self._lock:
            return [entry.freeze() for entry in self._by_key.values()]

    def clear(self) -> None:
        with self._lock:
            self._by_key.clear()
            self.evicted = 0


class _Entry:
    """The mutable folding state behind one (kind, location); frozen into a Finding on read,
    so a hot repeat costs a few attribute updates rather than a new dataclass."""

    __slots__ = ("count", "duration", "first", "last_seen")

    def __init__(self, first: Finding) -> None:
        self.first = first
        self.count = first.count
        self.duration = first.duration
        self.last_seen = first.last_seen

    def fold(self, finding: Finding) -> None:
        self.count += finding.count
        self.last_seen = finding.last_seen
        if finding.duration is not None and (
            self.duration is None or finding.duration > self.duration
        ):
            self.duration = finding.duration

    def freeze(self) -> Finding:
        first = self.first
        return dataclasses.replace(
            first, count=self.count, duration=self.duration, last_seen=self.last_seen
        )


def _log(finding: Finding) -> None:
    message = finding.describe()
    if finding.count > 1:
        message += " (repeats are folded; logged again at the next power of ten)"
    if finding.stack:
        message += "\n" + "".join(finding.stack).rstrip("\n")
    logger.warning(
        "asyncdiag: %s",
        message,
        extra={"asyncdiag_finding": finding},
    )


# The process-wide store. Findings survive uninstall (so a summary can still be printed) and are
# cleared by ``asyncdiag.findings.clear`` / the testing helpers.
STORE = FindingStore()


def report(
    kind: str,
    message: str,
    subject: str,
    *,
    location: str | None = None,
    duration: float | None = None,
    task: str | None = None,
    stack: Iterable[str] = (),
    span: Any = None,
) -> int:
    """Report one occurrence of a mistake. Never raises; returns how many times this kind
    was seen at this location so far (0 if the report itself failed)."""
    try:
        if kind not in _names.FINDING_KINDS:
            raise ValueError(f"unknown finding kind {kind!r}")
        now = time.time()
        finding = Finding(
            kind=kind,
            message=message,
            subject=subject,
            location=location,
            duration=duration,
            task=task,
            stack=stack if type(stack) is tuple else tuple(stack),
            first_seen=now,
            last_seen=now,
        )
        return STORE.add(finding, span)
    except Exception as exc:
        _safety.hook_failed(f"report({kind})", exc)
        return 0


def format_summary(findings: list[Finding], *, evicted: int = 0) -> str:
    """A short human summary, one line per folded finding, grouped by kind."""
    if not findings:
        return "asyncdiag: no async mistakes found.\n"
    lines = [f"asyncdiag: {len(findings)} distinct async mistake(s) found"
             f" ({sum(f.count for f in findings)} occurrence(s)):"]
    order = {kind: i for i, kind in enumerate(_names.FINDING_KINDS)}
    for finding in sorted(findings, key=lambda f: (order.get(f.kind, 99), -f.count)):
        where = finding.location or "(location unknown)"
        detail = [f"x{finding.count}"]
        if finding.duration is not None:
            detail.append(f"max {_format_duration(finding.duration)}")
        lines.append(f"  {finding.kind:<24} {where}  {finding.subject}  [{', '.join(detail)}]")
        lines.append(f"  {'':<24} {finding.message}")
    if evicted:
        lines.append(f"  (+{evicted} older distinct finding(s) dropped to bound memory)")
    return "\n".join(lines) + "\n"
