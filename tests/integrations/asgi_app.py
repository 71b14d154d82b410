"""A FastAPI service for the integration tests: routes that block, a background task.

Run under a real uvicorn by ``asgi_server.py`` (stalls as JSON lines) and
``prom_server.py`` (metrics to Prometheus); lines marked ``MARK:`` are asserted on.
Between them the routes produce every metric the dashboard shows from loopguard:
stalls, blocking calls, offloaded calls, a guarded WebSocket receive loop (queue
size, drops, time in queue), a broadcast subscriber evicted for falling behind and
(under load) shed requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import BackgroundTasks, FastAPI, WebSocket
from loopguard_integrations.broadcast import Broadcast
from loopguard_integrations.starlette import guard_receive
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import loopguard


def burn(seconds: float) -> int:
    """Hold the loop in pure Python."""
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:  # MARK:burn
        n += 1
    return n


async def rebuild_index(seconds: float) -> None:
    """The seed's anti-pattern: CPU work in an ``async def`` background task."""
    burn(seconds)  # MARK:background


@loopguard.offload(limit=1, name_in_metrics="resize")
def resize(seconds: float) -> str:
    """A blocking function run in a worker thread, one call at a time (so calls queue)."""
    time.sleep(seconds)
    return "resized"


def make_app() -> FastAPI:
    broadcast = Broadcast("memory://")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with broadcast:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/items/{item_id}")
    async def item(item_id: int, hold: float = 0.0) -> dict[str, int]:
        burn(hold)  # MARK:item
        return {"item": item_id}

    @app.post("/orders/{order_id}/sleep")
    async def sleeper(order_id: int, hold: float = 0.0) -> dict[str, int]:
        time.sleep(hold)  # MARK:sleep
        return {"order": order_id}

    @app.post("/reports")
    async def report(background: BackgroundTasks, hold: float = 0.0) -> dict[str, str]:
        background.add_task(rebuild_index, hold)
        return {"queued": "yes"}

    @app.get("/cpu")
    async def cpu(hold: float = 0.05) -> dict[str, str]:
        burn(hold)
        return {"cpu": "done"}

    @app.get("/nap")
    async def nap() -> dict[str, str]:
        await asyncio.sleep(0.001)
        return {"nap": "done"}

    @app.websocket("/ingest")
    async def ingest(websocket: WebSocket) -> None:
        # A guarded receive loop with a slow consumer: queue size, drops, time in queue.
        await websocket.accept()
        async with guard_receive(websocket, maxsize=2, overflow="drop_oldest") as inbox:
            async for _reading in inbox:
                await asyncio.sleep(0.05)

    @app.post("/announce")
    async def announce(count: int = 3) -> dict[str, int]:
        # A subscriber that never reads: its queue of one overflows and it is evicted.
        evicted = 0
        async with broadcast.subscribe("news", maxsize=1, overflow="close"):
            for i in range(count):
                evicted += (await broadcast.publish("news", f"item {i}")).evicted
        return {"evicted": evicted}

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    async def admin_user(request: Request) -> PlainTextResponse:
        burn(float(request.query_params.get("hold", "0")))  # MARK:admin
        return PlainTextResponse(request.path_params["uid"])

    # A plain Starlette app under a mount: the route template is the mount's path
    # followed by the inner route's.
    app.mount("/admin", Starlette(routes=[Route("/users/{uid}", admin_user)]))

    @app.get("/resize")
    async def resize_route(hold: float = 0.05) -> dict[str, str]:
        return {"result": await resize(hold)}

    return app
