"""One configuration object, resolved once: explicit arguments, then environment, then defaults.

Every environment variable of the contract is parsed here and nowhere else. An invalid value
never raises: it is replaced by the default and a human sentence naming the variable and the
value used instead is collected in ``Config.problems`` for the agent to log once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

Exporter = Literal["otlp", "console", "none"]
EXPORTERS: tuple[Exporter, ...] = ("otlp", "console", "none")

ENV_ENABLED = "ASYNCDIAG_ENABLED"
ENV_DEBUG = "ASYNCDIAG_DEBUG"
ENV_SLOW_CALLBACK_MS = "ASYNCDIAG_SLOW_CALLBACK_MS"
ENV_BLOCKED_MS = "ASYNCDIAG_BLOCKED_MS"
ENV_TRACK_ASYNCGENS = "ASYNCDIAG_TRACK_ASYNCGENS"
ENV_INSTRUMENT = "ASYNCDIAG_INSTRUMENT"
ENV_EXPORTER = "ASYNCDIAG_EXPORTER"
# Not named by the contract (it leaves the teardown threshold to us): same shape as the others.
ENV_SLOW_TEARDOWN_MS = "ASYNCDIAG_SLOW_TEARDOWN_MS"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

# Thresholds outside these bounds are almost certainly a unit mistake (seconds given as ms or
# the reverse); they are refused with a warning rather than silently producing no findings.
_MIN_SECONDS = 0.001
_MAX_SLOW_CALLBACK_SECONDS = 60.0
_MAX_BLOCKED_SECONDS = 3600.0
_MAX_TEARDOWN_SECONDS = 3600.0

# module[.sub]*:Qualname[.Inner]*  or  module[.sub]*.*  (fnmatch-style glob on module names)
_TARGET_RE = re.compile(
    r"^(?:[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*"
    r"|[A-Za-z_*?\[\]][\w*?\[\].]*)$"
)


@dataclasses.dataclass(frozen=True)
class Config:
    debug: bool = False
    slow_callback_duration: float = 0.1
    blocked_threshold: float = 1.0
    track_asyncgens: bool = True
    instrument: tuple[str, ...] = ()
    exporter: Exporter = "console"
    slow_teardown_threshold: float = 0.5
    # Human sentences about invalid input; excluded from equality so that two installs with the
    # same effective settings compare equal.
    problems: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def differences(self, other: Config) -> list[str]:
        """Names of the settings in which ``other`` differs from this configuration."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.compare and getattr(self, f.name) != getattr(other, f.name)
        ]


def env_flag_enabled(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(ENV_ENABLED, "").strip().lower() in _TRUE


def otlp_endpoint_configured(environ: Mapping[str, str]) -> bool:
    return any(
        environ.get(name, "").strip()
        for name in (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        )
    )


class _Resolver:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def _refuse(self, source: str, raw: object, why: str, default: object) -> None:
        self.problems.append(f"{source}={raw!r} {why}; using {default!r} instead")

    def flag(self, arg: object, env: str, argname: str, default: bool) -> bool:
        if arg is not None:
            if isinstance(arg, bool):
                return arg
            self._refuse(argname, arg, "is not a bool", default)
            return default
        raw = self.environ.get(env)
        if raw is None:
            return default
        value = raw.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        self._refuse(env, raw, "is not one of 1/0/true/false/yes/no/on/off", default)
        return default

    def seconds(
        self, arg: object, env: str, argname: str, default: float, maximum: float
    ) -> float:
        """``arg`` is in seconds (API); the environment variable is in milliseconds."""
        if arg is not None:
            source, raw, scale = argname, arg, 1.0
            number: float | None = (
                float(arg) if isinstance(arg, (int, float)) and not isinstance(arg, bool) else None
            )
            unit = "seconds"
        else:
            raw_env = self.environ.get(env)
            if raw_env is None or not raw_env.strip():
                return default
            source, raw, scale, unit = env, raw_env, 1000.0, "milliseconds"
            try:
                number = float(raw_env.strip())
            except ValueError:
                number = None
        shown_default = default * scale
        if number is None or math.isnan(number):
            self._refuse(source, raw, f"is not a number of {unit}", shown_default)
            return default
        value = number / scale
        if value < _MIN_SECONDS:
            self._refuse(
                source, raw, f"is below the minimum of {_MIN_SECONDS * scale:g} {unit}",
                shown_default,
            )
            return default
        if value > maximum or math.isinf(value):
            self._refuse(
                source, raw, f"is above the maximum of {maximum * scale:g} {unit}", shown_default
            )
            return default
        return value

    def targets(self, arg: object) -> tuple[str, ...]:
        if arg is not None:
            if isinstance(arg, str):
                items: Iterable[object] = arg.split(",")
                source = "instrument"
            elif isinstance(arg, Iterable):
                items, source = arg, "instrument"
            else:
                self._refuse("instrument", arg, "is not a list of targets", ())
                return ()
        else:
            items, source = self.environ.get(ENV_INSTRUMENT, "").split(","), ENV_INSTRUMENT
        result: list[str] = []
        for item in items:
            if not isinstance(item, str):
                self.problems.append(f"{source}: target {item!r} is not a string; ignored")
                continue
            target = item.strip()
            if not target:
                continue
            if not _TARGET_RE.match(target):
                self.problems.append(
                    f"{source}: target {target!r} is neither 'module:Qualname' nor a "
                    "'package.*' glob; ignored"
                )
                continue
            if target not in result:
                result.append(target)
        return tuple(result)

    def exporter(self, arg: object) -> Exporter:
        default: Exporter = "otlp" if otlp_endpoint_configured(self.environ) else "console"
        if arg is not None:
            source, raw = "exporter", arg
        else:
            raw_env = self.environ.get(ENV_EXPORTER)
            if raw_env is None or not raw_env.strip():
                return default
            source, raw = ENV_EXPORTER, raw_env
        value = raw.strip().lower() if isinstance(raw, str) else raw
        for known in EXPORTERS:
            if value == known:
                return known
        self._refuse(source, raw, f"is not one of {', '.join(EXPORTERS)}", default)
        return default


def resolve(
    *,
    debug: object = None,
    slow_callback_duration: object = None,
    blocked_threshold: object = None,
    track_asyncgens: object = None,
    instrument: object = None,
    exporter: object = None,
    slow_teardown_threshold: object = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration. ``None`` for an argument means "from the environment"."""
    r = _Resolver(os.environ if environ is None else environ)
    defaults = Config()
    config = Config(
        debug=r.flag(debug, ENV_DEBUG, "debug", defaults.debug),
        slow_callback_duration=r.seconds(
            slow_callback_duration, ENV_SLOW_CALLBACK_MS, "slow_callback_duration",
            defaults.slow_callback_duration, _MAX_SLOW_CALLBACK_SECONDS,
        ),
        blocked_threshold=r.seconds(
            blocked_threshold, ENV_BLOCKED_MS, "blocked_threshold",
            defaults.blocked_threshold, _MAX_BLOCKED_SECONDS,
        ),
        track_asyncgens=r.flag(
            track_asyncgens, ENV_TRACK_ASYNCGENS, "track_asyncgens", defaults.track_asyncgens
        ),
        instrument=r.targets(instrument),
        exporter=r.exporter(exporter),
        slow_teardown_threshold=r.seconds(
            slow_teardown_threshold, ENV_SLOW_TEARDOWN_MS, "slow_teardown_threshold",
            defaults.slow_teardown_threshold, _MAX_TEARDOWN_SECONDS,
        ),
    )
    return dataclasses.replace(config, problems=tuple(r.problems))


def describe(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.compare}
