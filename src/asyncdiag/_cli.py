"""The ``asyncdiag`` command: ``run`` any command with the agent on, or ``demo``.

``asyncdiag run [options] -- COMMAND ...`` works like ``opentelemetry-instrument``: it turns
the options into the contract's environment variables, sets ``ASYNCDIAG_ENABLED=1`` and
replaces itself with COMMAND. Any Python process of this environment then starts with the
agent installed by ``asyncdiag_autostart.pth``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

from . import __version__, _config


def _add_agent_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("agent options (each overrides its environment variable)")
    group.add_argument("--debug", action="store_true", default=None,
                       help=f"loop debug mode on every loop ({_config.ENV_DEBUG}=1)")
    group.add_argument("--slow-callback-ms", type=float, metavar="MS",
                       help=f"slow callback threshold ({_config.ENV_SLOW_CALLBACK_MS})")
    group.add_argument("--blocked-ms", type=float, metavar="MS",
                       help=f"loop-blocked watchdog threshold ({_config.ENV_BLOCKED_MS})")
    group.add_argument("--slow-teardown-ms", type=float, metavar="MS",
                       help=f"slow __aexit__/aclose threshold ({_config.ENV_SLOW_TEARDOWN_MS})")
    group.add_argument("--no-track-asyncgens", dest="track_asyncgens", action="store_false",
                       default=None,
                       help=f"no orphaned async generator detection "
                            f"({_config.ENV_TRACK_ASYNCGENS}=0)")
    group.add_argument("--instrument", action="append", metavar="TARGET",
                       help=f"module:Qualname or package.* to instrument; repeatable "
                            f"({_config.ENV_INSTRUMENT})")
    group.add_argument("--exporter", choices=_config.EXPORTERS,
                       help=f"where telemetry goes ({_config.ENV_EXPORTER})")


def _options_to_env(options: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    if options.debug:
        env[_config.ENV_DEBUG] = "1"
    if options.slow_callback_ms is not None:
        env[_config.ENV_SLOW_CALLBACK_MS] = f"{options.slow_callback_ms:g}"
    if options.blocked_ms is not None:
        env[_config.ENV_BLOCKED_MS] = f"{options.blocked_ms:g}"
    if options.slow_teardown_ms is not None:
        env[_config.ENV_SLOW_TEARDOWN_MS] = f"{options.slow_teardown_ms:g}"
    if options.track_asyncgens is False:
        env[_config.ENV_TRACK_ASYNCGENS] = "0"
    if options.instrument:
        env[_config.ENV_INSTRUMENT] = ",".join(options.instrument)
    if options.exporter:
        env[_config.ENV_EXPORTER] = options.exporter
    return env


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncdiag",
        description="Find asyncio mistakes in running programs and export async telemetry.",
    )
    parser.add_argument("--version", action="version", version=f"asyncdiag {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run a command with the agent on",
        usage="asyncdiag run [options] -- COMMAND [ARGS ...]",
    )
    _add_agent_options(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND",
                     help="the command to run (after --)")

    demo = commands.add_parser(
        "demo", help="run a small service that commits each async mistake, and show the report"
    )
    _add_agent_options(demo)
    demo.add_argument("--rounds", type=int, default=1, metavar="N",
                      help="how many times the service repeats its mistakes; 0 = forever")
    demo.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                      help="pause between rounds")
    return parser


def _run(options: argparse.Namespace) -> int:
    command = list(options.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        sys.stderr.write("asyncdiag run: no command given (usage: asyncdiag run -- COMMAND)\n")
        return 2
    env = dict(os.environ)
    env.update(_options_to_env(options))
    env[_config.ENV_ENABLED] = "1"
    executable = shutil.which(command[0], path=env.get("PATH"))
    if executable is None:
        sys.stderr.write(f"asyncdiag run: command not found: {command[0]}\n")
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, command, env)
    except OSError as exc:
        sys.stderr.write(f"asyncdiag run: cannot run {command[0]}: {exc}\n")
        return 126
    return 0  # not reached


def _demo(options: argparse.Namespace) -> int:
    os.environ.update(_options_to_env(options))
    from . import _demo

    return _demo.main(rounds=options.rounds, interval=options.interval)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    options = parser.parse_args(argv)
    if options.command == "run":
        return _run(options)
    if options.command == "demo":
        return _demo(options)
    parser.print_help()
    return 2
