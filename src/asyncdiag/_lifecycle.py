"""Install and uninstall: the agent, its components, and the one global that holds it.

The agent is a list of components started in order. Each component undoes only what it did;
``uninstall`` stops them in reverse order, and a failure half-way through ``install`` stops
those already started, so the interpreter is left as it was found. Lifecycle errors are
reported with exceptions and log lines, never with ``assert`` (which ``-O`` removes).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING, Protocol

from . import _config, _findings, _safety

if TYPE_CHECKING:
    from ._loops import LoopRegistry
    from ._telemetry import Telemetry

logger = logging.getLogger("asyncdiag")


class Component(Protocol):
    """A concern of the agent. ``start`` may raise (install rolls back); ``stop`` must not."""

    name: str

    def start(self, agent: Agent) -> None: ...

    def stop(self) -> None: ...


class InstallError(RuntimeError):
    """``install()`` failed and everything it had done was rolled back."""


class _FallbackHandler(logging.Handler):
    """Shows asyncdiag's warnings on stderr only while the application configured no logging.

    Adding a plain StreamHandler would print every line twice once the application calls
    ``logging.basicConfig``; this one steps aside as soon as the root logger has handlers.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            stream = sys.stderr
            if stream is None:
                return
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class _LoggingComponent:
    name = "logging"

    def __init__(self) -> None:
        self._handler: _FallbackHandler | None = None

    def start(self, agent: Agent) -> None:
        self._handler = _FallbackHandler()
        logger.addHandler(self._handler)

    def stop(self) -> None:
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler = None


class Agent:
    """The installed agent. Obtain it from ``asyncdiag.install()``; do not construct it."""

    def __init__(self, config: _config.Config) -> None:
        self.config = config
        self.store = _findings.STORE
        self._components: list[Component] = []
        self._started: list[Component] = []
        self.loops: LoopRegistry
        self.telemetry: Telemetry

    def __repr__(self) -> str:
        running = "installed" if self._started else "stopped"
        return f"<asyncdiag.Agent {running} {_config.describe(self.config)}>"

    @property
    def installed(self) -> bool:
        return bool(self._started)

    def component(self, name: str) -> Component | None:
        for component in self._components:
            if component.name == name:
                return component
        return None

    def _build(self) -> None:
        # Imported here so that importing asyncdiag (e.g. by the .pth file with the agent off)
        # does not import OpenTelemetry, wrapt and the detectors.
        from ._asyncgens import AsyncgenTracker
        from ._exit_summary import ExitSummary
        from ._instrumentation import Instrumentation
        from ._loopmon import LoopMonitor
        from ._loops import LoopRegistry
        from ._telemetry import Telemetry

        self.telemetry = Telemetry()
        self.loops = LoopRegistry()
        components: list[Component] = [
            _LoggingComponent(),
            self.telemetry,
            self.loops,
            LoopMonitor(),
        ]
        if self.config.track_asyncgens:
            components.append(AsyncgenTracker())
        components.append(Instrumentation())
        components.append(ExitSummary())
        self._components = components

    def _start(self) -> None:
        self._build()
        for component in self._components:
            try:
                component.start(self)
            except BaseException as exc:
                self._started.append(component)  # a half-started component undoes its part
                self._stop()
                raise InstallError(
                    f"asyncdiag could not start {component.name!r}: {exc!r}; "
                    "everything it had installed was rolled back"
                ) from exc
            self._started.append(component)
        for problem in self.config.problems:
            logger.warning("asyncdiag: %s", problem)

    def _stop(self) -> None:
        while self._started:
            component = self._started.pop()
            try:
                component.stop()
            except Exception:
                logger.warning("asyncdiag: stopping %s failed", component.name, exc_info=True)


_lock = threading.RLock()
_agent: Agent | None = None


def install(
    *,
    debug: bool | None = None,
    slow_callback_duration: float | None = None,
    blocked_threshold: float | None = None,
    track_asyncgens: bool | None = None,
    instrument: str | tuple[str, ...] | list[str] | None = None,
    exporter: str | None = None,
    slow_teardown_threshold: float | None = None,
) -> Agent:
    """Install the agent (idempotent). Arguments left as ``None`` come from the environment.

    A second call returns the agent already installed; if it asks for a different
    configuration, a warning names the differences and the first configuration stays.
    """
    global _agent
    config = _config.resolve(
        debug=debug,
        slow_callback_duration=slow_callback_duration,
        blocked_threshold=blocked_threshold,
        track_asyncgens=track_asyncgens,
        instrument=instrument,
        exporter=exporter,
        slow_teardown_threshold=slow_teardown_threshold,
    )
    with _lock:
        if _agent is not None:
            differences = _agent.config.differences(config)
            if differences:
                logger.warning(
                    "asyncdiag: install() called again with a different configuration (%s); "
                    "keeping the one already installed. Call asyncdiag.uninstall() first to "
                    "change it.",
                    ", ".join(differences),
                )
            return _agent
        agent = Agent(config)
        agent._start()
        _agent = agent
        return agent


def uninstall() -> None:
    """Undo everything ``install()`` did, in reverse order. Safe to call when not installed."""
    global _agent
    with _lock:
        agent, _agent = _agent, None
        if agent is None:
            return
        agent._stop()
        _safety.reset()


def current() -> Agent | None:
    return _agent
