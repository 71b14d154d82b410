"""Real WebSocket servers for the guard's tests: uvicorn (each implementation) and websockets.

Each server runs its own event loop in a thread of the test process, on a free port of
127.0.0.1, so a test can read the server side's inboxes directly. Client *processes*
(``ws_client.py``) stand in for peers that can be killed or frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn

# uvicorn's "websockets" implementation is websockets' legacy API, deprecated upstream;
# import it once here so its warning does not fail the tests that exercise it.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", UserWarning)  # uvicorn's own deprecation notice
    import uvicorn.protocols.websockets.websockets_impl
from websockets.asyncio.server import Server, ServerConnection, serve

#: uvicorn's three WebSocket implementations; the guard is tested on each.
UVICORN_WS = ("websockets", "websockets-sansio", "wsproto")
CLIENT = Path(__file__).with_name("ws_client.py")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Poll ``predicate`` from a plain thread (never on a loop) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.02)


@contextlib.contextmanager
def uvicorn_server(app: Any, ws: str, **options: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn with WebSocket implementation ``ws``; yield its ws:// URL."""
    port = free_port()
    with warnings.catch_warnings():  # the legacy implementation says it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ws=ws,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=5,
            **options,
        )
        config.load()
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{ws}", daemon=True)
    with warnings.catch_warnings():
        # The legacy implementation warns on every connection (websockets' old API).
        warnings.filterwarnings("ignore", "remove second argument", DeprecationWarning)
        thread.start()
        yield from _serving(server, thread, port)


def _serving(server: uvicorn.Server, thread: threading.Thread, port: int) -> Iterator[str]:
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 30, "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


class LoopThread:
    """An event loop in a thread, for servers whose handlers the test inspects."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ws-server", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def arun(self, coro: Any) -> Any:
        """:meth:`run` for a caller that is itself on an event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def websockets_server(
    handler: Callable[[ServerConnection], Any], **options: Any
) -> Iterator[tuple[str, LoopThread]]:
    """Run a ``websockets.asyncio`` server in a loop thread; yield its URL and the thread."""
    loops = LoopThread()
    server: Server = loops.run(_start(handler, options))
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}", loops
    finally:
        server.close()
        loops.run(server.wait_closed())
        loops.close()


@contextlib.asynccontextmanager
async def websockets_server_async(
    handler: Callable[[ServerConnection], Any], **options: Any
) -> AsyncIterator[tuple[str, LoopThread]]:
    """:func:`websockets_server` for async tests (nothing blocks the test's loop)."""
    manager = websockets_server(handler, **options)
    entered = await asyncio.to_thread(manager.__enter__)
    try:
        yield entered
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


async def _start(handler: Callable[[ServerConnection], Any], options: dict[str, Any]) -> Server:
    server: Server = await serve(handler, "127.0.0.1", 0, **options)
    return server


@contextlib.contextmanager
def client_process(url: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A real client process (``ws_client.py URL ARGS``); killed at the end if still alive."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "integrations")])}
    proc = subprocess.Popen(
        [sys.executable, str(CLIENT), url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.communicate(timeout=30)


def ready(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """Wait for the client's first line ("connected" or "sent N")."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"client exited: {proc.stderr.read() if proc.stderr else ''}"
    return line.strip()


async def eventually(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` from a coroutine until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def guard_tasks(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[Any]]:
    """The guard's tasks still alive on ``loop`` (call from the loop or after it idles)."""
    return [t for t in asyncio.all_tasks(loop) if t.get_name().startswith("loopguard-ws-")]
