"""pytest plugin: fail the tests that commit the async mistakes asyncdiag finds.

Loaded by pytest in every run of this environment (``pytest11`` entry point), so at load it
only declares options and markers: nothing is installed and OpenTelemetry is not imported
until the plugin is asked for with ``--asyncdiag``, the ``asyncdiag = true`` ini option, or
``@pytest.mark.asyncdiag`` on some test.

Attribution is by capture window: a findings-store listener appends every reported finding
to the test whose setup/call/teardown is running. Objects that die in reference cycles are
finalized by a ``gc.collect()`` at the end of the call and at the end of teardown, inside the
window, so an orphaned generator or a forgotten coroutine is charged to the test that made
it rather than to whichever later test the collector happens to run in. Findings of the call
(and setup) fail the test; findings that only appear while its fixtures are torn down fail
its teardown, as any fixture error does.

Two details keep that cheap and exact. After each test, what is still alive is moved to the
permanent GC generation (``gc.freeze``), so the next test's collections walk only what it
allocated. And before judging, the plugin lets the loop watchdog thread report the steps it
was still timing (it reports at its next poll, possibly after the test returned).

The terminal summary is built from the test reports' user properties (also written to
JUnit XML), so that under pytest-xdist the controller can summarize what the workers found.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gc
import inspect
import os
import sys
import threading
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any

import pytest

from . import _findings, _names

PLUGIN_NAME = "asyncdiag-session"

# Mistakes that are wrong whatever the machine's speed. The timing kinds (slow_callback,
# slow_teardown) depend on how loaded the CI runner is, so by default they are only listed in
# the summary; loop_blocked fails because its threshold is the user's explicit budget.
DEFAULT_FAIL_ON: tuple[str, ...] = (
    _names.LOOP_BLOCKED,
    _names.ORPHANED_ASYNCGEN,
    _names.SWALLOWED_EXCEPTION,
    _names.SWALLOWED_CANCELLATION,
    _names.NEVER_AWAITED,
    _names.UNRETRIEVED_EXCEPTION,
    _names.PENDING_TASK_DESTROYED,
)

MARKER = "asyncdiag"
ALLOW_MARKER = "asyncdiag_allow"
PROPERTY_ALLOWED = "asyncdiag_allowed"
PROPERTY_REPORTED = "asyncdiag_reported"
PROPERTY_FAILED = "asyncdiag_failed"
_WORKER_OUTPUT_KEY = "asyncdiag_outside"
_MAX_STACK_FRAMES = 8
_THAW_EVERY = 100
_MAX_RAW_PER_TEST = 1000


# -- hooks active in every pytest run (cheap: options and markers only) ----------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("asyncdiag", "asyncdiag: fail tests that commit async mistakes")
    group.addoption(
        "--asyncdiag", action="store_true", default=None, dest="asyncdiag",
        help="run every test with the asyncdiag agent and fail tests that produce findings",
    )
    group.addoption(
        "--asyncdiag-blocked-ms", dest="asyncdiag_blocked_ms", metavar="MS", default=None,
        help="loop_blocked threshold in milliseconds (ini asyncdiag_blocked_ms)",
    )
    group.addoption(
        "--asyncdiag-slow-callback-ms", dest="asyncdiag_slow_callback_ms", metavar="MS",
        default=None,
        help="slow_callback threshold in milliseconds (ini asyncdiag_slow_callback_ms)",
    )
    parser.addini("asyncdiag", "run every test with asyncdiag (like --asyncdiag)",
                  type="bool", default=False)
    parser.addini(
        "asyncdiag_fail_on",
        "finding kinds that fail a test ('all' for every kind); the others are only listed",
        type="linelist", default=list(DEFAULT_FAIL_ON),
    )
    parser.addini(
        "asyncdiag_allow",
        "known findings that never fail a test, one per line: kind[:location-glob], "
        "e.g. orphaned_asyncgen:tests/test_x.py:42 or never_awaited:*/vendor/*",
        type="linelist", default=[],
    )
    parser.addini("asyncdiag_blocked_ms", "loop_blocked threshold in milliseconds", default="")
    parser.addini("asyncdiag_slow_callback_ms", "slow_callback threshold in milliseconds",
                  default="")
    parser.addini("asyncdiag_slow_teardown_ms", "slow_teardown threshold in milliseconds",
                  default="")
    parser.addini("asyncdiag_instrument",
                  "instrument targets (module:Qualname or package.*), one per line",
                  type="linelist", default=[])
    parser.addini("asyncdiag_exporter",
                  "telemetry exporter while testing: none (default), console or otlp",
                  default="")
    parser.addini("asyncdiag_gc_collect",
                  "run gc.collect() at the end of each test's call and teardown, so objects "
                  "in reference cycles are charged to the test that made them",
                  type="bool", default=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: run this test with the asyncdiag agent and fail it on async mistakes",
    )
    config.addinivalue_line(
        "markers",
        f"{ALLOW_MARKER}(kind, *locations, reason=None): findings of this kind (at these "
        "path:line globs, default anywhere) do not fail this test; they are listed instead",
    )
    if _enabled_for_session(config):
        config.pluginmanager.register(AsyncdiagPlugin(config, every_test=True), PLUGIN_NAME)
    elif _is_xdist_controller(config):
        # Workers may check @pytest.mark.asyncdiag tests that the controller never collects:
        # it only gathers their results for the summary (and installs nothing).
        config.pluginmanager.register(AsyncdiagPlugin(config, every_test=False), PLUGIN_NAME)


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if config.pluginmanager.has_plugin(PLUGIN_NAME):
        return
    if any(item.get_closest_marker(MARKER) is not None for item in items):
        config.pluginmanager.register(AsyncdiagPlugin(config, every_test=False), PLUGIN_NAME)


def _is_xdist_controller(config: pytest.Config) -> bool:
    return getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")


def _enabled_for_session(config: pytest.Config) -> bool:
    if config.getoption("asyncdiag", None):
        return True
    return bool(config.getini("asyncdiag"))


# -- allow rules ---------------------------------------------------------------------------
# Plain classes rather than dataclasses here: this module is imported by every pytest run of
# the environment, and each dataclass costs milliseconds to create at import.
class AllowRule:
    """``kind`` and ``where`` are fnmatch globs; ``where`` matches a finding's location
    (absolute, or relative to the rootdir) or its subject."""

    __slots__ = ("kind", "origin", "reason", "where")

    def __init__(
        self, kind: str, where: str | None, origin: str, reason: str | None = None
    ) -> None:
        self.kind = kind
        self.where = where
        self.origin = origin
        self.reason = reason

    def __repr__(self) -> str:
        return f"AllowRule({self.kind!r}, {self.where!r}, {self.origin!r}, {self.reason!r})"

    def __str__(self) -> str:
        text = self.kind if self.where is None else f"{self.kind}:{self.where}"
        return f"{text} ({self.origin}{', ' + self.reason if self.reason else ''})"

    def matches(self, finding: _findings.Finding, rootpath: Path) -> bool:
        if not fnmatch.fnmatchcase(finding.kind, self.kind):
            return False
        if self.where is None or self.where == "*":
            return True
        candidates = [finding.subject]
        if finding.location:
            candidates.append(finding.location)
            relative = _relative_location(finding.location, rootpath)
            if relative != finding.location:
                candidates.append(relative)
        patterns = [self.where]
        if not self.where.startswith(("/", "*")):
            patterns.append("*/" + self.where)
        return any(fnmatch.fnmatchcase(c, p) for c in candidates for p in patterns)


def _check_kind_glob(kind: str) -> str | None:
    """The reason ``kind`` can never match, or None."""
    if not kind:
        return "empty kind"
    if any(ch in kind for ch in "*?["):
        if not any(fnmatch.fnmatchcase(k, kind) for k in _names.FINDING_KINDS):
            return f"pattern {kind!r} matches no finding kind"
        return None
    if kind not in _names.FINDING_KINDS:
        return f"unknown finding kind {kind!r} (known: {', '.join(_names.FINDING_KINDS)})"
    return None


def parse_allow_line(line: str, origin: str) -> AllowRule:
    """``kind`` or ``kind:location-glob`` (the glob may itself contain ``:line``)."""
    kind, _, where = line.strip().partition(":")
    kind, where = kind.strip(), where.strip()
    problem = _check_kind_glob(kind)
    if problem:
        raise ValueError(f"{origin}: {line.strip()!r}: {problem}")
    return AllowRule(kind, where or None, origin)


def _marker_rules(item: pytest.Item) -> list[AllowRule]:
    rules: list[AllowRule] = []
    for marker in item.iter_markers(ALLOW_MARKER):
        origin = f"@pytest.mark.{ALLOW_MARKER}"
        reason = marker.kwargs.get("reason")
        reason = str(reason) if reason is not None else None
        if not marker.args or not all(isinstance(a, str) for a in marker.args):
            raise ValueError(f"{origin} needs a finding kind and optional location globs "
                             f"(strings), got {marker.args!r}")
        first, *locations = marker.args
        if not locations and ":" in first:
            rule = parse_allow_line(first, origin)
            rule.reason = reason
            rules.append(rule)
            continue
        problem = _check_kind_glob(first)
        if problem:
            raise ValueError(f"{origin}: {problem}")
        rules.extend(AllowRule(first, where, origin, reason) for where in locations or [None])
    return rules


# -- formatting ----------------------------------------------------------------------------
def _relative_location(location: str, rootpath: Path) -> str:
    path, sep, line = location.rpartition(":")
    if not sep or not os.path.isabs(path):
        return location
    try:
        relative = Path(path).relative_to(rootpath)
    except ValueError:
        return location
    return f"{relative.as_posix()}:{line}"


def _folded(previous: _findings.Finding, finding: _findings.Finding) -> _findings.Finding:
    durations = [d for d in (previous.duration, finding.duration) if d is not None]
    return dataclasses.replace(
        previous,
        count=previous.count + finding.count,
        duration=max(durations) if durations else None,
        last_seen=finding.last_seen,
    )


def _fold_into(
    folded: dict[tuple[str, str], _findings.Finding], finding: _findings.Finding
) -> None:
    previous = folded.get(finding.key)
    folded[finding.key] = finding if previous is None else _folded(previous, finding)


def _fold(findings: Iterable[_findings.Finding]) -> list[_findings.Finding]:
    """Repeats folded by kind and location, in order of first occurrence."""
    folded: dict[tuple[str, str], _findings.Finding] = {}
    for finding in findings:
        _fold_into(folded, finding)
    return list(folded.values())


def _display(finding: _findings.Finding, rootpath: Path) -> _findings.Finding:
    if finding.location is None:
        return finding
    return dataclasses.replace(finding, location=_relative_location(finding.location, rootpath))


def format_failure(
    findings: list[_findings.Finding], rootpath: Path, *, when: str,
    notes: list[str] | None = None,
) -> str:
    """The failure text of one test: the console summary of its findings, their stacks, and
    how to allow one."""
    shown = [_display(f, rootpath) for f in _fold(findings)]
    # The first line is what pytest's short summary shows: name the mistakes there.
    headline = ", ".join(f"{f.kind} at {f.location or f.subject}" for f in shown[:3])
    if len(shown) > 3:
        headline += f" and {len(shown) - 3} more"
    lines = [f"asyncdiag: {headline}"]
    if when == "teardown":
        lines.append("asyncdiag: async mistakes found while this test was torn down "
                     "(after the test body ended: fixtures finalized, objects collected).")
    lines.append(_findings.format_summary(shown).rstrip("\n"))
    for finding in shown:
        if finding.stack:
            lines.append(f"{finding.kind} at {finding.location or '(location unknown)'}"
                         " (stack without pytest, pluggy, asyncio and asyncdiag frames):")
            lines.extend(_user_stack(finding.stack))
    lines.extend(notes or ())
    example = shown[0]
    where = f', "{example.location}"' if example.location else ""
    lines.append(
        f'To accept a known finding: @pytest.mark.{ALLOW_MARKER}("{example.kind}"{where}) '
        f"on the test, or the ini option asyncdiag_allow = {example.kind}"
        f"{':' + example.location if example.location else ''}"
    )
    return "\n".join(lines)


def _framework_dirs() -> tuple[str, ...]:
    dirs = []
    for name in ("_pytest", "pytest", "pluggy", "pytest_asyncio", "asyncio", "asyncdiag",
                 "uvloop", "runpy"):
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if file:
            dirs.append(file if name == "runpy" else os.path.dirname(file) + os.sep)
    return tuple(dirs)


def _user_stack(stack: tuple[str, ...]) -> list[str]:
    """The stack's frames outside the test machinery, innermost last, at most a few."""
    markers = (*(f'File "{d}' for d in _framework_dirs()), 'File "<frozen ')
    kept = [entry for entry in stack if not any(m in entry for m in markers)] or list(stack)
    text = "".join(kept[-_MAX_STACK_FRAMES:]).rstrip("\n").splitlines()
    return (["  ..."] if len(kept) > _MAX_STACK_FRAMES else []) + text


def _one_line(finding: _findings.Finding, rootpath: Path) -> str:
    shown = _display(finding, rootpath)
    text = f"{shown.kind} {shown.location or '(location unknown)'} {shown.subject}"
    if shown.count > 1:
        text += f" x{shown.count}"
    if shown.duration is not None:
        text += f" ({_findings._format_duration(shown.duration)})"
    return text


# -- the active plugin ---------------------------------------------------------------------
def _settle_watchdog(*, thorough: bool) -> None:
    """Wait until the loop watchdog has reported the steps that ran during the test, so that a
    slow_callback does not land in the next test. Cheap mode waits only while a step is being
    timed; thorough mode (used when slow_callback fails tests) waits for a poll of every loop."""
    watchdog_module = sys.modules.get("asyncdiag._watchdog")
    watchdog = getattr(watchdog_module, "_MONITOR", None)
    if watchdog is not None:
        watchdog.settle(thorough=thorough)


def _milliseconds(config: pytest.Config, option: str | None, ini: str) -> float | None:
    raw = config.getoption(option, None) if option else None
    source = f"--{option.replace('_', '-')}" if raw is not None and option else ini
    if raw is None:
        raw = config.getini(ini)
    if raw is None or not str(raw).strip():
        return None
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise pytest.UsageError(f"{source}={raw!r} is not a number of milliseconds") from None
    return value / 1000.0


def _fail_on(config: pytest.Config) -> frozenset[str]:
    kinds: set[str] = set()
    for line in config.getini("asyncdiag_fail_on"):
        for item in line.replace(",", " ").split():
            if item == "all":
                kinds.update(_names.FINDING_KINDS)
            elif item in _names.FINDING_KINDS:
                kinds.add(item)
            else:
                raise pytest.UsageError(
                    f"asyncdiag_fail_on: unknown finding kind {item!r} "
                    f"(known: {', '.join(_names.FINDING_KINDS)}, or 'all')"
                )
    return frozenset(kinds)


class _Window:
    __slots__ = ("nodeid", "overflow", "pending")

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        # Raw occurrences (a capture() block claims them by identity), then, past the bound,
        # a hot repeated mistake is folded by kind and location so memory stays bounded.
        self.pending: list[_findings.Finding] = []
        self.overflow: dict[tuple[str, str], _findings.Finding] = {}

    def add(self, finding: _findings.Finding) -> None:
        if len(self.pending) < _MAX_RAW_PER_TEST:
            self.pending.append(finding)
        else:
            _fold_into(self.overflow, finding)

    def take(self) -> list[_findings.Finding]:
        taken = [*self.pending, *self.overflow.values()]
        self.pending, self.overflow = [], {}
        return taken


class _Listed:
    __slots__ = ("finding", "why")

    def __init__(self, finding: _findings.Finding, why: str) -> None:
        self.finding = finding
        self.why = why


class AsyncdiagPlugin:
    """Registered only when asyncdiag is asked for. ``every_test``: the agent is on for the
    whole session and every test is checked; otherwise only ``@pytest.mark.asyncdiag``
    tests are, with the agent installed around each of them."""

    def __init__(self, config: pytest.Config, *, every_test: bool) -> None:
        self.config = config
        self.every_test = every_test
        self.rootpath = config.rootpath
        self.fail_on = _fail_on(config)
        try:
            self.ini_rules = [parse_allow_line(line, "ini asyncdiag_allow")
                              for line in config.getini("asyncdiag_allow") if line.strip()]
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.install_kwargs = self._install_kwargs(config)
        self.gc_collect = bool(config.getini("asyncdiag_gc_collect"))
        self.thorough_settle = _names.SLOW_CALLBACK in self.fail_on
        self._lock = threading.Lock()
        self._window: _Window | None = None
        self._last_nodeid: str | None = None
        self._listening = False
        self._we_installed = False
        self._items: list[pytest.Item] = []
        self._code_index: dict[str, list[tuple[int, int, str]]] | None = None
        self._frozen = False
        self._tests_since_thaw = 0
        self._gc_collect = gc.collect
        self._thawing = self._thawing_collect  # one bound method, to compare by identity
        # Built from the test reports (so that pytest-xdist workers' results reach the
        # controller's summary): (nodeid, text) per allowed / listed-only / failing finding.
        self.allowed: list[tuple[str, str]] = []
        self.reported: list[tuple[str, str]] = []
        # Outside any test: this process's, and the lines xdist workers sent back.
        self.remote_outside: list[tuple[str, bool]] = []
        # An xdist controller runs no tests: it only gathers the workers' results.
        self.controller = _is_xdist_controller(config)
        self.outside: dict[tuple[str, str], _Listed] = {}
        self.failed_tests: list[str] = []

    @staticmethod
    def _install_kwargs(config: pytest.Config) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "blocked_threshold": _milliseconds(config, "asyncdiag_blocked_ms",
                                               "asyncdiag_blocked_ms"),
            "slow_callback_duration": _milliseconds(config, "asyncdiag_slow_callback_ms",
                                                    "asyncdiag_slow_callback_ms"),
            "slow_teardown_threshold": _milliseconds(config, None, "asyncdiag_slow_teardown_ms"),
        }
        targets = [t.strip() for t in config.getini("asyncdiag_instrument") if t.strip()]
        if targets:
            kwargs["instrument"] = tuple(targets)
        exporter = str(config.getini("asyncdiag_exporter")).strip()
        if exporter:
            kwargs["exporter"] = exporter
        elif not os.environ.get("ASYNCDIAG_EXPORTER", "").strip():
            # Tests should not print an exit summary or ship telemetry unless asked to.
            kwargs["exporter"] = "none"
        return {k: v for k, v in kwargs.items() if v is not None}

    # -- agent and listener --------------------------------------------------------------
    def _ensure_installed(self) -> None:
        from . import _lifecycle

        if _lifecycle.current() is None:
            try:
                _lifecycle.install(**self.install_kwargs)
            except _lifecycle.InstallError as exc:
                raise pytest.UsageError(f"asyncdiag: {exc}") from exc
            self._we_installed = True

    def _uninstall_if_ours(self) -> None:
        if self._we_installed:
            from . import _lifecycle

            self._we_installed = False
            _lifecycle.uninstall()

    def _listen(self) -> None:
        if not self._listening:
            _findings.STORE.add_listener(self._on_finding)
            self._listening = True

    def _unlisten(self) -> None:
        if self._listening:
            _findings.STORE.remove_listener(self._on_finding)
            self._listening = False

    def _on_finding(self, finding: _findings.Finding) -> None:
        # Any thread (watchdog, GC finalizers): only append under the lock.
        with self._lock:
            window = self._window
            if window is not None:
                window.add(finding)
                return
            previous = self.outside.get(finding.key)
            if previous is not None:
                previous.finding = _folded(previous.finding, finding)
            else:
                where = f"after {self._last_nodeid}" if self._last_nodeid else "before any test"
                self.outside[finding.key] = _Listed(finding, where)

    def _collect_garbage(self) -> None:
        if self.gc_collect:
            self._gc_collect()

    # A full collection walks every tracked object: tens of milliseconds in a pytest process
    # with OpenTelemetry loaded, twice per test. So what is alive at the end of a test (and so
    # is not that test's garbage) is moved to the permanent generation with gc.freeze(), and
    # the next test's collections only walk what it allocated. Frozen objects are still freed
    # by reference counting; only cycles among them wait for the periodic thaw (everything
    # unfrozen and collected once every _THAW_EVERY tests) or the end of the session. A test
    # that calls gc.collect() itself thaws first, so its collection is as complete as without
    # the plugin.
    def _freeze_survivors(self) -> None:
        if not (self.gc_collect and self.every_test):
            return
        self._tests_since_thaw += 1
        if self._frozen and self._tests_since_thaw >= _THAW_EVERY:
            self._tests_since_thaw = 0
            self._unfreeze()
            self._gc_collect()
        if gc.collect is self._gc_collect:
            gc.collect = self._thawing
        gc.freeze()
        self._frozen = True

    def _thawing_collect(self, generation: int = 2) -> int:
        if generation >= 2:
            self._unfreeze()
        return self._gc_collect(generation)

    def _unfreeze(self) -> None:
        if self._frozen:
            self._frozen = False
            gc.unfreeze()

    def _stop_freezing(self) -> None:
        if gc.collect is self._thawing:
            gc.collect = self._gc_collect
        self._unfreeze()

    def _checked(self, item: pytest.Item) -> bool:
        if self.controller:
            return False
        return self.every_test or item.get_closest_marker(MARKER) is not None

    # -- session -------------------------------------------------------------------------
    def pytest_configure(self, config: pytest.Config) -> None:
        # Installed here rather than at session start: an agent that cannot start is then a
        # clear usage error instead of an internal error, and import-time findings of
        # collected modules are seen.
        config.add_cleanup(self._shutdown)
        if self.every_test and not self.controller:
            self._listen()
            self._ensure_installed()

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self._stop_freezing()
        if self._listening:
            self._collect_garbage()
        self._shutdown()
        outside = self._outside_lines()
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller reports and decides
            workeroutput[_WORKER_OUTPUT_KEY] = outside
        elif any(failing for _, failing in outside) and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _shutdown(self) -> None:
        self._stop_freezing()
        self._uninstall_if_ours()
        self._unlisten()

    # -- one test ------------------------------------------------------------------------
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, object, object]:
        # A problem is raised only after the other setup hooks ran: raising before them would
        # leave pytest's setup state without this item and break its teardown.
        problem = None
        if self._checked(item):
            try:
                item.stash[_RULES] = self.ini_rules + _marker_rules(item)
            except ValueError as exc:
                item.stash[_RULES] = self.ini_rules
                problem = f"{item.nodeid}: {exc}"
            self._listen()
            try:
                self._ensure_installed()
            except pytest.UsageError as exc:
                problem = str(exc)
            with self._lock:
                self._window = _Window(item.nodeid)
        result = yield
        if problem:
            pytest.fail(problem, pytrace=False)
        return result

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            if self._window is not None:
                self._collect_garbage()
                _settle_watchdog(thorough=self.thorough_settle)

    # Outermost, so the collection runs after every fixture and other wrapper has finished.
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            if self._window is not None:
                self._collect_garbage()
                _settle_watchdog(thorough=self.thorough_settle)
                self._freeze_survivors()
                if not self.every_test:
                    self._uninstall_if_ours()
                    self._unlisten()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        window = self._window
        if window is None or window.nodeid != item.nodeid:
            return report
        last = call.when == "teardown"
        # Skipped phases (a skip in setup, an xfail) pass their findings on: teardown judges
        # whatever is left, so nothing seen in the window goes unjudged.
        if report.skipped and not last:
            return report
        with self._lock:
            findings = window.take()
            if last:
                self._window = None
                self._last_nodeid = item.nodeid
        if findings:
            self._judge(item, report, findings, call.when)
        return report

    def _judge(
        self, item: pytest.Item, report: pytest.TestReport,
        findings: list[_findings.Finding], when: str,
    ) -> None:
        rules = item.stash.get(_RULES, self.ini_rules)
        failing: list[_findings.Finding] = []
        testing = sys.modules.get("asyncdiag.testing")
        if testing is not None:
            # Captured with asyncdiag.testing.capture() by the test, to assert on.
            findings = [f for f in findings if not testing.is_claimed(f)]
        for finding in _fold(findings):
            rule = next((r for r in rules if r.matches(finding, self.rootpath)), None)
            if rule is not None:
                self._add_property(item, report, PROPERTY_ALLOWED,
                                   f"{_one_line(finding, self.rootpath)}  [allowed by {rule}]")
            elif finding.kind in self.fail_on:
                failing.append(finding)
            else:
                self._add_property(item, report, PROPERTY_REPORTED,
                                   _one_line(finding, self.rootpath))
        if not failing:
            return
        text = format_failure(failing, self.rootpath, when=when,
                              notes=self._other_test_notes(item, failing))
        if report.passed:
            report.outcome = "failed"
            report.longrepr = text
        else:
            report.sections.append(("asyncdiag findings", text))
        self._add_property(item, report, PROPERTY_FAILED, text.splitlines()[0])

    @staticmethod
    def _add_property(
        item: pytest.Item, report: pytest.TestReport, name: str, value: str
    ) -> None:
        # junitxml writes the properties of the teardown report, which copies the item's.
        report.user_properties.append((name, value))
        item.user_properties.append((name, value))

    # -- findings made by another test's code -------------------------------------------
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._items = list(session.items)

    def _test_code_index(self) -> dict[str, list[tuple[int, int, str]]]:
        """Test functions by file: (first line, last line, test name), built on first use."""
        if self._code_index is not None:
            return self._code_index
        index: dict[str, list[tuple[int, int, str]]] = {}
        seen: set[tuple[str, int]] = set()
        for item in self._items:
            code = getattr(inspect.unwrap(getattr(item, "obj", None) or (lambda: None)),
                           "__code__", None)
            if code is None or (code.co_filename, code.co_firstlineno) in seen:
                continue
            seen.add((code.co_filename, code.co_firstlineno))
            lines = [line for _, _, line in code.co_lines() if line is not None]
            name = item.nodeid.split("[", 1)[0]
            index.setdefault(code.co_filename, []).append(
                (code.co_firstlineno, max(lines, default=code.co_firstlineno), name))
        self._code_index = index
        return index

    def _other_test_notes(
        self, item: pytest.Item, findings: list[_findings.Finding]
    ) -> list[str]:
        """For a finding whose location is inside another test's function: that test made
        the object (a generator, a coroutine, a task) that this one only released."""
        own = item.nodeid.split("[", 1)[0]
        notes = []
        try:
            for finding in _fold(findings):
                path, sep, line = (finding.location or "").rpartition(":")
                if not sep or not line.isdigit():
                    continue
                number = int(line)
                for first, last, name in self._test_code_index().get(path, ()):
                    if first <= number <= last and name != own:
                        notes.append(
                            f"note: {_relative_location(finding.location or '', self.rootpath)}"
                            f" is in the code of {name}: that test made the object, and it "
                            "was only finalized while this test ran"
                        )
                        break
        except Exception:  # a hint only: never let it hide the findings themselves
            return notes
        return notes

    # -- report --------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # The teardown report carries every property of the test (it copies the item's).
        if report.when != "teardown":
            return
        for name, value in report.user_properties:
            if name == PROPERTY_ALLOWED:
                self.allowed.append((report.nodeid, str(value)))
            elif name == PROPERTY_REPORTED:
                self.reported.append((report.nodeid, str(value)))
            elif name == PROPERTY_FAILED and report.nodeid not in self.failed_tests:
                self.failed_tests.append(report.nodeid)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist: a worker finished; keep its findings from outside any test."""
        output = getattr(node, "workeroutput", None) or {}
        for line, failing in output.get(_WORKER_OUTPUT_KEY, ()):
            self.remote_outside.append((str(line), bool(failing)))

    def _outside_lines(self) -> list[tuple[str, bool]]:
        local = [(f"{_one_line(x.finding, self.rootpath)}  [{x.why}]",
                  x.finding.kind in self.fail_on) for x in self.outside.values()]
        return local + self.remote_outside

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        outside = self._outside_lines()
        if not (self.allowed or self.reported or outside or self.failed_tests):
            return
        write = terminalreporter.write_line
        terminalreporter.write_sep("=", "asyncdiag")
        if self.failed_tests:
            write(f"{len(self.failed_tests)} test(s) failed because of async mistakes:")
            for nodeid in self.failed_tests:
                write(f"  {nodeid}")
        if self.allowed:
            write("allowed findings (asyncdiag_allow):")
            for nodeid, text in self.allowed:
                write(f"  {nodeid}: {text}")
        if self.reported:
            write("findings of kinds that do not fail tests (asyncdiag_fail_on):")
            for nodeid, text in self.reported:
                write(f"  {nodeid}: {text}")
        if outside:
            failing = sum(1 for _, is_failing in outside if is_failing)
            write("findings outside any test (collection, between tests, session end)"
                  + (f"; {failing} of a failing kind, so the session fails:" if failing
                     else ":"))
            for text, _ in outside:
                write(f"  {text}")


_RULES = pytest.StashKey[list[AllowRule]]()
