"""The ``loopguard`` command: ``run`` a program under the watchdog, ``demo``, ``report``.

``loopguard run -- CMD`` needs no change to the program: it puts loopguard's start-up
hook (a ``sitecustomize``) first on ``PYTHONPATH`` and passes the settings as
``LOOPGUARD_*`` variables, then replaces itself with CMD. Every Python process CMD
starts installs the watchdog at interpreter start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from textwrap import fill
from typing import Any

from ._watchdog import ENV_PREFIX, Config, env_options

__all__ = ["main"]

_BOOTSTRAP_DIR = str(Path(__file__).resolve().parent / "_bootstrap")

_RUN_EPILOG = """\
examples:
  loopguard run -- python app.py
  loopguard run --threshold 0.05 --json stalls.jsonl -- uvicorn app:app
  loopguard run -- python -m mypackage

Every option can also be set with an environment variable: {variables}.
Each stall is reported on stderr when it ends; a summary is printed at exit.
"""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopguard",
        description="Find the line that blocks your event loop, while it blocks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run a command with the watchdog installed in every Python process it starts",
        description="Run CMD with the loopguard watchdog installed from interpreter start.",
        epilog=_RUN_EPILOG.format(variables=fill(", ".join(o.variable for o in env_options()), 70)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for option in env_options():
        if option.cli is not None:
            kwargs = dict(option.cli)
            if option.parse is float:
                kwargs["type"] = _seconds
            kwargs.setdefault("default", None)
            run.add_argument("--" + option.name.replace("_", "-"), **kwargs)
    run.add_argument("--no-summary", action="store_true", help="print no summary at exit")
    run.add_argument(
        "--otel",
        action="store_true",
        help="send metrics and stall events over OTLP/HTTP (to the OTEL_EXPORTER_OTLP_* "
        "endpoint; needs loopguard[otel])",
    )
    run.add_argument(
        "--prometheus",
        metavar="HOST:PORT",
        help="serve metrics for Prometheus on HOST:PORT (needs loopguard[otel])",
    )
    run.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the command to run"
    )

    demo = sub.add_parser(
        "demo",
        help="run a small service that stalls its loop and show what loopguard reports",
        description="Run a self-contained demo service under `loopguard run` (about 10 s).",
    )
    run.set_defaults(subparser=run)
    demo.set_defaults(subparser=demo)
    demo.add_argument("--json", metavar="FILE", default=None, help="also write events to FILE")
    demo.add_argument(
        "scenario",
        nargs="?",
        choices=["websocket"],
        help="`websocket`: a WebSocket receive loop that falls behind, then guard_receive "
        "(needs the websockets package; about 25 s)",
    )

    report = sub.add_parser(
        "report",
        help="summarise a JSON-lines file written by `loopguard run --json`",
        description="Group the stalls of a --json file by culprit and its blocking calls by "
        "call and line, as the summary at exit does.",
    )
    report.add_argument("file", help="the JSON-lines file")
    report.set_defaults(subparser=report)
    return parser


def _version() -> str:
    from ._version import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loopguard`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    sub: argparse.ArgumentParser = args.subparser  # errors show the subcommand's usage
    if args.command == "run":
        return _run(sub, args)
    if args.command == "demo":
        return _demo(args)
    return _report(sub, args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        parser.error("missing the command to run (loopguard run [OPTIONS] -- CMD [ARGS...])")
    env = dict(os.environ)
    given = {o.name: getattr(args, o.name) for o in env_options() if o.cli is not None}
    given = {name: value for name, value in given.items() if value is not None}
    if "json" in given:
        path = Path(given["json"]).resolve()
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            parser.error(f"cannot write --json file {args.json!r}: {exc.strerror or exc}")
        given["json"] = str(path)
    try:  # the options as given, then with the environment, as the child will read them
        Config(**{k: v for k, v in given.items() if k != "json"})
    except ValueError as exc:
        parser.error(f"{exc}")
    for name, value in given.items():
        if isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, list):
            value = " ".join(value)
        env[ENV_PREFIX + name.upper()] = str(value)
    if args.no_summary:
        env[ENV_PREFIX + "SUMMARY"] = "0"
    env.update(_otel_outputs(parser, args))
    try:
        Config.from_env(env)
    except ValueError as exc:
        parser.error(f"{exc}")
    env["PYTHONPATH"] = os.pathsep.join(
        [_BOOTSTRAP_DIR, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
    exe = shutil.which(cmd[0], path=env.get("PATH"))
    if exe is None:
        sys.stderr.write(f"loopguard: command not found: {cmd[0]}\n")
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(exe, cmd, env)


def _otel_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """The variables that ask the started processes for OpenTelemetry outputs."""
    if not (args.otel or args.prometheus):
        return {}
    try:
        from . import otel
    except ImportError as exc:
        parser.error(f"--otel and --prometheus need loopguard[otel] ({exc})")
    out = {}
    if args.otel:
        out[ENV_PREFIX + "OTEL"] = "1"
    if args.prometheus:
        try:
            otel.host_port(args.prometheus)
        except ValueError as exc:
            parser.error(f"--prometheus: {exc}")
        out[ENV_PREFIX + "PROMETHEUS"] = args.prometheus
    return out


def _demo(args: argparse.Namespace) -> int:
    run = [sys.executable, "-m", "loopguard", "run"]
    if args.json:
        run += ["--json", args.json]
    module = "loopguard._demo"
    if getattr(args, "scenario", None) == "websocket":
        # Framework code lives in loopguard_integrations; loopguard only starts it.
        import importlib.util

        if any(
            importlib.util.find_spec(m) is None for m in ("websockets", "loopguard_integrations")
        ):
            sys.stderr.write("loopguard demo websocket needs the websockets package\n")
            return 2
        module = "loopguard_integrations.demo_websocket"
    run += ["--", sys.executable, "-m", module]
    return subprocess.call(run)


def _report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ._watchdog import StallSummary

    summary = StallSummary(max_culprits=1000)
    kinds: dict[str, int] = {}
    try:
        with open(args.file, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    kind = data.get("kind", "?")
                    event = _event_of(kind, data)
                except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
                    parser.error(f"{args.file}:{number} is not a loopguard JSON line")
                kinds[kind] = kinds.get(kind, 0) + 1
                if event is not None:
                    summary.emit(event)
    except OSError as exc:
        parser.error(f"cannot read {args.file!r}: {exc.strerror or exc}")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no events"
    print(f"{args.file}: {counts}")
    for line in summary.table_lines(max_rows=1000):
        print(line)
    return 0


def _event_of(kind: str, data: dict[str, Any]) -> object:
    """The event a JSON line holds, as far as a summary needs it (stalls, blocking calls)."""
    from .events import BlockingCall, Frame, Stall

    def frame(value: object) -> Frame | None:
        if not isinstance(value, dict):
            return None
        return Frame(str(value["file"]), int(value["line"]), str(value["function"]))

    if kind == "stall":
        return Stall(
            started_at=float(data.get("started_at", 0.0)),
            duration=float(data.get("duration", 0.0)),
            cause=str(data.get("cause", "")),
            task=data.get("task"),
            culprit=frame(data.get("culprit")),
        )
    if kind == "blocking_call":
        return BlockingCall(
            function=str(data["function"]),
            duration=float(data.get("duration", 0.0)),
            task=data.get("task"),
            stack=(),
            action=str(data.get("action", "")),
            culprit=frame(data.get("culprit")),
            suppressed=int(data.get("suppressed", 0)),
        )
    return None
