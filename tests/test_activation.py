"""Activation without code change, in real subprocesses: the .pth file, ``asyncdiag run``,
``python -m asyncdiag``, the exit summary and the demo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from asyncdiag import _names

SCRIPTS = Path(sys.executable).parent
CLI = str(SCRIPTS / "asyncdiag")


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("ASYNCDIAG_", "OTEL_", "PYTEST_"))
    }
    env.update(extra)
    return env


def run_python(code: str, *, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=clean_env(**env), capture_output=True, text=True, timeout=timeout,
    )


REPORT_STATE = """
    import sys
    agent = None
    if "asyncdiag" in sys.modules:
        from asyncdiag import _lifecycle
        agent = _lifecycle.current()
    print("imported" if "asyncdiag" in sys.modules else "not-imported")
    print("installed" if agent is not None else "not-installed")
    if agent is not None:
        print(agent.config.slow_callback_duration, agent.config.exporter, agent.config.debug)
"""


def test_pth_file_is_installed_next_to_the_package() -> None:
    import asyncdiag

    site_dir = Path(asyncdiag.__file__).resolve().parents[1]
    candidates = [Path(p) / "asyncdiag_autostart.pth" for p in sys.path if p]
    assert any(c.is_file() for c in candidates), f"no asyncdiag_autostart.pth on {site_dir}"


def test_pth_does_nothing_when_not_enabled() -> None:
    result = run_python(REPORT_STATE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["not-imported", "not-installed"]
    assert result.stderr == ""


@pytest.mark.parametrize("value", ["0", ""])
def test_pth_does_nothing_when_disabled(value: str) -> None:
    result = run_python(REPORT_STATE, ASYNCDIAG_ENABLED=value)
    assert result.stdout.split() == ["not-imported", "not-installed"]


@pytest.mark.parametrize("value", ["no", "false", "off", "2"])
def test_pth_does_not_install_for_other_false_values(value: str) -> None:
    result = run_python(REPORT_STATE, ASYNCDIAG_ENABLED=value)
    assert result.returncode == 0
    assert result.stdout.split()[1] == "not-installed"


def test_pth_installs_at_startup_when_enabled() -> None:
    result = run_python(
        REPORT_STATE, ASYNCDIAG_ENABLED="1", ASYNCDIAG_SLOW_CALLBACK_MS="30",
        ASYNCDIAG_EXPORTER="none",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["imported", "installed", "0.03", "none", "False"]


def test_invalid_env_value_warns_once_and_program_runs() -> None:
    result = run_python(
        "print('host ran')", ASYNCDIAG_ENABLED="1", ASYNCDIAG_SLOW_CALLBACK_MS="abc",
        ASYNCDIAG_EXPORTER="none",
    )
    assert result.returncode == 0
    assert result.stdout == "host ran\n"
    assert result.stderr.count("ASYNCDIAG_SLOW_CALLBACK_MS='abc'") == 1
    assert "using 100.0 instead" in result.stderr


def test_run_command_enables_the_agent_in_the_child() -> None:
    result = subprocess.run(
        [CLI, "run", "--slow-callback-ms", "40", "--debug", "--exporter", "none", "--",
         sys.executable, "-c", textwrap.dedent(REPORT_STATE)],
        env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["imported", "installed", "0.04", "none", "True"]


def test_run_command_passes_exit_status_and_arguments() -> None:
    result = subprocess.run(
        [CLI, "run", "--exporter", "none", "--", sys.executable, "-c",
         "import sys; print(sys.argv[1:]); sys.exit(7)", "a b", "--flag"],
        env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 7
    assert result.stdout == "['a b', '--flag']\n"


def test_run_command_errors_are_clear() -> None:
    missing = subprocess.run([CLI, "run", "--"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no command given" in missing.stderr
    unknown = subprocess.run([CLI, "run", "--", "no-such-command-xyz"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 127 and "command not found" in unknown.stderr


def test_python_dash_m_asyncdiag() -> None:
    result = subprocess.run([sys.executable, "-m", "asyncdiag", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("asyncdiag ")


def test_exit_summary_with_console_exporter() -> None:
    code = """
        import asyncdiag
        from asyncdiag import _findings
        asyncdiag.install(exporter="console")
        for _ in range(1000):
            _findings.report("slow_callback", "step blocked", "app.handler",
                             location="app.py:12", duration=0.2)
        print("done")
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    summary = result.stderr[result.stderr.index("distinct async mistake"):]
    assert "slow_callback" in summary and "app.py:12" in summary and "x1000" in summary
    # folded: one log line for the first occurrence, then one per power of ten
    assert result.stderr.count("[slow_callback] step blocked") == 4


def test_no_exit_summary_with_exporter_none() -> None:
    code = """
        import asyncdiag
        from asyncdiag import _findings
        asyncdiag.install(exporter="none")
        _findings.report("slow_callback", "step blocked", "f", location="app.py:3")
    """
    result = run_python(code)
    assert result.returncode == 0
    assert "distinct async mistake" not in result.stderr


def test_fallback_log_handler_steps_aside_once_app_configures_logging() -> None:
    code = """
        import logging
        import asyncdiag
        from asyncdiag import _findings
        asyncdiag.install(exporter="none")
        _findings.report("slow_callback", "first one", "f", location="a.py:1")
        logging.basicConfig(format="APP %(message)s")
        _findings.report("slow_callback", "second one", "f", location="a.py:2")
    """
    result = run_python(code)
    lines = result.stderr.splitlines()
    assert [line for line in lines if "first one" in line] == [
        "asyncdiag: [slow_callback] first one at a.py:1"
    ]
    assert [line for line in lines if "second one" in line] == [
        "APP asyncdiag: [slow_callback] second one at a.py:2"
    ]


def test_uvloop_imported_after_install_gets_settings() -> None:
    pytest.importorskip("uvloop")
    code = """
        import sys, asyncio
        import asyncdiag
        assert "uvloop" not in sys.modules
        asyncdiag.install(slow_callback_duration=0.33, debug=True, exporter="none")
        import uvloop
        async def main():
            loop = asyncio.get_running_loop()
            return type(loop).__module__, loop.get_debug(), loop.slow_callback_duration
        loop = uvloop.new_event_loop()
        print(loop.run_until_complete(main()))
        loop.close()
        print(uvloop.run(main()))
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["('uvloop', True, 0.33)"] * 2


def test_demo_runs_without_a_collector() -> None:
    result = subprocess.run(
        [CLI, "demo"], env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "asyncdiag demo" in result.stderr
    summary = result.stderr[result.stderr.index("distinct async mistake"):]
    rows = [line.split() for line in summary.splitlines()[1:] if line.startswith("  ") and
            line.split()[0] in _names.FINDING_KINDS]
    kinds = {row[0] for row in rows}
    assert kinds == set(_names.FINDING_KINDS), summary
    # every mistake is pinned to the demo's own line, not to asyncio or asyncdiag internals
    for row in rows:
        assert "_demo.py:" in row[1], row


def test_exit_summary_is_silent_for_processes_without_event_loops() -> None:
    quiet = run_python("print('no asyncio here')", ASYNCDIAG_ENABLED="1",
                       ASYNCDIAG_EXPORTER="console")
    assert quiet.returncode == 0
    assert quiet.stderr == ""
    with_loop = run_python("import asyncio; asyncio.run(asyncio.sleep(0))",
                           ASYNCDIAG_ENABLED="1", ASYNCDIAG_EXPORTER="console")
    assert "asyncdiag: no async mistakes found." in with_loop.stderr


def test_pytest_run_under_the_agent_gets_no_extra_warning(tmp_path: Path) -> None:
    """The package is imported at start-up (.pth) and also ships a pytest11 plugin: pytest
    must not warn that it cannot rewrite it (that warning fails suites run with -W error)."""
    (tmp_path / "test_plain.py").write_text("def test_ok():\n    pass\n")
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
         str(tmp_path)],
        env=clean_env(ASYNCDIAG_ENABLED="1", ASYNCDIAG_EXPORTER="none"),
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "warning" not in result.stdout.lower()
