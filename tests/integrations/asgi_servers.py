"""Real uvicorn servers in subprocesses, serving ``asgi_app`` with loopguard installed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
ROOT = HERE.parent.parent

sys.path.insert(0, str(HERE.parent))

from services import free_port, stop  # noqa: E402


class Server:
    """A uvicorn server serving ``asgi_app`` with loopguard, and the events it wrote."""

    def __init__(self, base: str, events: Path) -> None:
        self.base = base
        self.events_path = events

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        # The last line may be half written: only whole lines count.
        lines = self.events_path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        """The first event ``match`` accepts, waiting for the server to write it."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if match(e)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching event; got {self.events()}")
            time.sleep(0.1)


def child_env() -> dict[str, str]:
    """The environment of a child process importing this checkout's packages."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "integrations")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def wait_until_serving(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not answer within 60 s: {log.read_text()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def spawn(
    command: list[str], port: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run a server command in a child process until it answers; yield its base URL."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**child_env(), **(env or {})}
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, proc, log)
        yield base
    finally:
        stop(proc)


@contextlib.contextmanager
def serve(tmp: Path, options: dict[str, Any] | None) -> Iterator[Server]:
    """Run ``asgi_server.py`` (the middleware with ``options``; ``None``: without it)."""
    port = free_port()
    events = tmp / "events.jsonl"
    args = [sys.executable, str(HERE / "asgi_server.py"), str(port), str(events)]
    args.append("none" if options is None else json.dumps(options))
    with spawn(args, port, tmp / "server.log") as base:
        yield Server(base, events)
