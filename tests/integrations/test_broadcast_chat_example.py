"""The chat example under ``uvicorn --workers 2`` against a real Redis: a client on one
worker process hears a client on the other."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import services
from websockets.sync.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def chat_server(tmp_path: Path) -> Iterator[str]:
    """The example app served by two uvicorn worker processes; yields its ws:// URL."""
    pytest.importorskip("fastapi")
    with services.redis(tmp_path) as redis_port:
        port = services._free_port()
        env = dict(os.environ)
        env["CHAT_BROADCAST_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        paths = [str(ROOT), str(ROOT / "integrations"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        log = (tmp_path / "uvicorn.log").open("wb")
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "app:app"),
                *("--app-dir", str(ROOT / "examples" / "chat"), "--workers", "2"),
                *("--host", "127.0.0.1", "--port", str(port)),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_workers(port, proc, tmp_path / "uvicorn.log")
            yield f"ws://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _wait_for_workers(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}: {log.read_text()}")
        if log.read_text().count("Application startup complete") >= 2:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"two uvicorn workers did not start in 90 s: {log.read_text()}")


def _join(stack: contextlib.ExitStack, url: str, name: str) -> tuple[ClientConnection, int]:
    ws = stack.enter_context(connect(f"{url}/ws/{name}", open_timeout=20))
    welcome = json.loads(ws.recv(timeout=20))
    assert welcome["event"] == "welcome"
    return ws, int(welcome["pid"])


def test_a_client_on_one_worker_hears_a_client_on_the_other(chat_server: str) -> None:
    with contextlib.ExitStack() as clients:
        first, first_pid = _join(clients, chat_server, "ann")
        # Workers take connections as they come: connect until another process serves one.
        other = None
        for attempt in range(60):
            ws, pid = _join(clients, chat_server, f"bob{attempt}")
            if pid != first_pid:
                other, other_pid = ws, pid
                break
        assert other is not None, "every connection was served by the same worker"
        assert other_pid != first_pid
        time.sleep(0.5)  # every join is in its room before the first message
        first.send("hello from ann")
        said = {"event": "message", "from": "ann", "pid": first_pid, "text": "hello from ann"}
        assert json.loads(other.recv(timeout=20)) == said
        assert json.loads(first.recv(timeout=20)) == said  # her own worker, once
        other.send("hello back")
        answer = json.loads(first.recv(timeout=20))
        assert answer["text"] == "hello back"
        assert answer["pid"] == other_pid
        assert json.loads(other.recv(timeout=20))["text"] == "hello back"
        # Nothing twice: no worker delivered Redis's echo of its own publish.
        for ws in (first, other):
            with pytest.raises(TimeoutError):
                ws.recv(timeout=1)
