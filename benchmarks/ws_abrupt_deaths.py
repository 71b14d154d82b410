"""1,000 WebSocket clients killed abruptly: is everything of theirs gone?

Runs a Starlette route on uvicorn (``websockets-sansio``) and a ``websockets`` server in
this process, both guarding their connections with ``guard_receive``. Client
*processes* open connections (50 each), send a few messages and are killed with
SIGKILL, no close frame sent, until 1,000 connections per server have died. Then it
checks, per server, that the ``websocket.connection.active`` metric (read with a real
OpenTelemetry SDK reader) is back to 0, that no guard task is left on the server loop,
that no ``Inbox`` is still referenced, and how the process's traced memory and RSS
compare with a warm-up baseline taken after the first 100 deaths.

``python benchmarks/ws_abrupt_deaths.py [--clients 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT), str(ROOT / "integrations")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _harness as h  # noqa: E402
import uvicorn  # noqa: E402
from loopguard_integrations import _receiver  # noqa: E402
from loopguard_integrations import starlette as lg_starlette  # noqa: E402
from loopguard_integrations import websockets as lg_websockets  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.routing import WebSocketRoute  # noqa: E402
from starlette.websockets import WebSocket  # noqa: E402
from websockets.asyncio.server import ServerConnection, serve  # noqa: E402

import loopguard.metrics  # noqa: E402

PER_PROCESS = 50
CLIENT = """
import asyncio, sys
from websockets.asyncio.client import connect
async def main(url, n):
    conns = [await connect(url, ping_interval=None) for _ in range(n)]
    for c in conns:
        await c.send("hello")
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _trim() -> None:
    """Give freed heap back to the OS (glibc), so RSS shows what is still in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def _consume(inbox: _receiver.Inbox) -> None:
    async for _ in inbox:
        pass


async def starlette_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    async with lg_starlette.guard_receive(websocket, maxsize=10, route="/deaths") as inbox:
        await _consume(inbox)


async def websockets_handler(connection: ServerConnection) -> None:
    async with lg_websockets.guard_receive(connection, maxsize=10, route="deaths") as inbox:
        await _consume(inbox)


def _kill_clients(url: str, count: int) -> None:
    for _ in range(count // PER_PROCESS):
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, url, str(PER_PROCESS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_inactive(timeout: float = 60.0) -> float:
    started = time.monotonic()
    while _receiver.active_connections() and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return time.monotonic() - started


def _active_metric(reader: InMemoryMetricReader) -> dict[str, float]:
    data = reader.get_metrics_data()
    found: dict[str, float] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == loopguard.metrics.WEBSOCKET_CONNECTION_ACTIVE:
                    for p in metric.data.data_points:
                        route = str(dict(p.attributes or {}).get("http.route", ""))
                        found[route] = float(getattr(p, "value", 0))
    return found


def main() -> int:
    """Kill ``--clients`` clients per server; print what is left."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args()
    reader = InMemoryMetricReader()
    loopguard.metrics.use_meter_provider(MeterProvider(metric_readers=[reader]))
    tracemalloc.start()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ws_server = asyncio.run_coroutine_threadsafe(_serve(), loop).result(30)
    ws_url = f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = uvicorn.Config(
            Starlette(routes=[WebSocketRoute("/deaths", starlette_endpoint)]),
            host="127.0.0.1",
            port=0,
            ws="websockets-sansio",
            log_level="error",
            lifespan="off",
        )
    server = uvicorn.Server(config)
    uv_thread = threading.Thread(target=server.run, daemon=True)
    uv_thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    uv_url = f"ws://127.0.0.1:{port}/deaths"

    rows: list[tuple[str, Any]] = []
    for name, url in (("uvicorn websockets-sansio", uv_url), ("websockets", ws_url)):
        _kill_clients(url, 100)  # warm-up: imports, caches, pools
        _wait_inactive()
        gc.collect()
        _trim()
        base_traced, base_rss = tracemalloc.get_traced_memory()[0], h.rss_bytes()
        started = time.monotonic()
        _kill_clients(url, args.clients)
        settle = _wait_inactive()
        took = time.monotonic() - started
        gc.collect()
        _trim()
        traced, rss = tracemalloc.get_traced_memory()[0], h.rss_bytes()
        inboxes = sum(isinstance(o, _receiver.Inbox) for o in gc.get_objects())
        rows.append(
            (
                name,
                {
                    "killed": args.clients,
                    "seconds": round(took, 1),
                    "settled after last kill s": round(settle, 2),
                    "active (registry)": _receiver.active_connections(),
                    "inboxes alive": inboxes,
                    "traced memory vs baseline KiB": round((traced - base_traced) / 1024, 1),
                    "RSS (after malloc_trim) vs baseline MiB": round((rss - base_rss) / 2**20, 2),
                },
            )
        )
    tasks = asyncio.run_coroutine_threadsafe(_guard_tasks(), loop).result(30)
    active = _active_metric(reader)
    server.should_exit = True
    uv_thread.join(30)
    ws_server.close()
    print(f"websocket.connection.active after: {active}")
    print(f"guard tasks left on the websockets server loop: {tasks}")
    for name, data in rows:
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in data.items()))
    ok = all(v == 0 for v in active.values()) and tasks == 0
    ok = ok and all(d["active (registry)"] == 0 and d["inboxes alive"] == 0 for _, d in rows)
    print("OK: nothing left behind" if ok else "FAILED: something was left behind")
    return 0 if ok else 1


async def _serve() -> Any:
    return await serve(websockets_handler, "127.0.0.1", 0)


async def _guard_tasks() -> int:
    return sum(t.get_name().startswith("loopguard-ws-") for t in asyncio.all_tasks())


if __name__ == "__main__":
    raise SystemExit(main())
