"""Configuration: arguments, then environment, then defaults; invalid input never raises."""

from __future__ import annotations

import logging

import pytest

import asyncdiag
from asyncdiag import _config
from asyncdiag._config import Config, resolve


def test_defaults_match_the_contract() -> None:
    config = resolve(environ={})
    assert config == Config(
        debug=False,
        slow_callback_duration=0.1,
        blocked_threshold=1.0,
        track_asyncgens=True,
        instrument=(),
        exporter="console",
    )
    assert config.problems == ()


@pytest.mark.parametrize(
    ("environ", "field", "expected"),
    [
        ({"ASYNCDIAG_DEBUG": "1"}, "debug", True),
        ({"ASYNCDIAG_DEBUG": "true"}, "debug", True),
        ({"ASYNCDIAG_DEBUG": "0"}, "debug", False),
        ({"ASYNCDIAG_DEBUG": " Off "}, "debug", False),
        ({"ASYNCDIAG_SLOW_CALLBACK_MS": "250"}, "slow_callback_duration", 0.25),
        ({"ASYNCDIAG_SLOW_CALLBACK_MS": "2.5"}, "slow_callback_duration", 0.0025),
        ({"ASYNCDIAG_BLOCKED_MS": "3000"}, "blocked_threshold", 3.0),
        ({"ASYNCDIAG_TRACK_ASYNCGENS": "0"}, "track_asyncgens", False),
        ({"ASYNCDIAG_TRACK_ASYNCGENS": "yes"}, "track_asyncgens", True),
        ({"ASYNCDIAG_INSTRUMENT": "a.b:C, d.*,,a.b:C"}, "instrument", ("a.b:C", "d.*")),
        ({"ASYNCDIAG_INSTRUMENT": "pkg.mod:Outer.Inner"}, "instrument", ("pkg.mod:Outer.Inner",)),
        ({"ASYNCDIAG_EXPORTER": "none"}, "exporter", "none"),
        ({"ASYNCDIAG_EXPORTER": "OTLP"}, "exporter", "otlp"),
        ({"ASYNCDIAG_EXPORTER": "console"}, "exporter", "console"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, "exporter", "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318"}, "exporter", "otlp"),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:4318"}, "exporter", "otlp"),
        ({"ASYNCDIAG_SLOW_TEARDOWN_MS": "1500"}, "slow_teardown_threshold", 1.5),
    ],
)
def test_valid_environment(environ: dict[str, str], field: str, expected: object) -> None:
    config = resolve(environ=environ)
    assert getattr(config, field) == expected
    assert config.problems == ()


@pytest.mark.parametrize(
    ("variable", "value", "field", "default"),
    [
        ("ASYNCDIAG_DEBUG", "maybe", "debug", False),
        ("ASYNCDIAG_SLOW_CALLBACK_MS", "abc", "slow_callback_duration", 0.1),
        ("ASYNCDIAG_SLOW_CALLBACK_MS", "-5", "slow_callback_duration", 0.1),
        ("ASYNCDIAG_SLOW_CALLBACK_MS", "0", "slow_callback_duration", 0.1),
        ("ASYNCDIAG_SLOW_CALLBACK_MS", "nan", "slow_callback_duration", 0.1),
        ("ASYNCDIAG_SLOW_CALLBACK_MS", "inf", "slow_callback_duration", 0.1),
        ("ASYNCDIAG_SLOW_CALLBACK_MS", "99999999", "slow_callback_duration", 0.1),
        ("ASYNCDIAG_BLOCKED_MS", "1e12", "blocked_threshold", 1.0),
        ("ASYNCDIAG_BLOCKED_MS", "ten", "blocked_threshold", 1.0),
        ("ASYNCDIAG_TRACK_ASYNCGENS", "2", "track_asyncgens", True),
        ("ASYNCDIAG_EXPORTER", "jaeger", "exporter", "console"),
        ("ASYNCDIAG_SLOW_TEARDOWN_MS", "-1", "slow_teardown_threshold", 0.5),
    ],
)
def test_invalid_environment_warns_and_uses_default(
    variable: str, value: str, field: str, default: object
) -> None:
    config = resolve(environ={variable: value})
    assert getattr(config, field) == default
    assert len(config.problems) == 1
    problem = config.problems[0]
    assert variable in problem
    assert repr(value) in problem
    assert "instead" in problem


def test_invalid_instrument_targets_are_dropped_with_a_warning() -> None:
    config = resolve(environ={"ASYNCDIAG_INSTRUMENT": "good.mod:Cls,bad target,:x,mod:"})
    assert config.instrument == ("good.mod:Cls",)
    assert len(config.problems) == 3
    assert all("ASYNCDIAG_INSTRUMENT" in p for p in config.problems)


def test_arguments_win_over_environment() -> None:
    config = resolve(
        debug=True,
        slow_callback_duration=0.5,
        exporter="none",
        instrument=["x.y:Z"],
        environ={
            "ASYNCDIAG_DEBUG": "0",
            "ASYNCDIAG_SLOW_CALLBACK_MS": "10",
            "ASYNCDIAG_EXPORTER": "otlp",
            "ASYNCDIAG_INSTRUMENT": "a:B",
        },
    )
    assert (config.debug, config.slow_callback_duration, config.exporter, config.instrument) == (
        True, 0.5, "none", ("x.y:Z",)
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "default"),
    [
        ({"slow_callback_duration": -1}, "slow_callback_duration", 0.1),
        ({"slow_callback_duration": "fast"}, "slow_callback_duration", 0.1),
        ({"blocked_threshold": True}, "blocked_threshold", 1.0),
        ({"debug": "yes"}, "debug", False),
        ({"exporter": "zipkin"}, "exporter", "console"),
        ({"instrument": 42}, "instrument", ()),
    ],
)
def test_invalid_arguments_warn_and_use_default(
    kwargs: dict[str, object], field: str, default: object
) -> None:
    config = resolve(environ={}, **kwargs)  # type: ignore[arg-type]
    assert getattr(config, field) == default
    assert len(config.problems) == 1
    assert next(iter(kwargs)) in config.problems[0]


def test_install_logs_each_problem_once_and_runs_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ASYNCDIAG_SLOW_CALLBACK_MS", "abc")
    monkeypatch.setenv("ASYNCDIAG_EXPORTER", "none")
    with caplog.at_level(logging.WARNING, logger="asyncdiag"):
        agent = asyncdiag.install()
    assert agent.config.slow_callback_duration == 0.1
    messages = [r.getMessage() for r in caplog.records if "ASYNCDIAG_SLOW_CALLBACK_MS" in
                r.getMessage()]
    assert messages == [
        "asyncdiag: ASYNCDIAG_SLOW_CALLBACK_MS='abc' is not a number of milliseconds; "
        "using 100.0 instead"
    ]


def test_enabled_flag() -> None:
    assert _config.env_flag_enabled({"ASYNCDIAG_ENABLED": "1"})
    assert _config.env_flag_enabled({"ASYNCDIAG_ENABLED": "TRUE"})
    assert not _config.env_flag_enabled({"ASYNCDIAG_ENABLED": "0"})
    assert not _config.env_flag_enabled({})
