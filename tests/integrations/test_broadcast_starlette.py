"""Broadcast groups with Starlette WebSockets under a real uvicorn server (in-process),
on each of uvicorn's WebSocket implementations."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio  # noqa: F401 - imported before any loop runs, as an app does

sys.path.insert(0, str(Path(__file__).parent))

from loopguard_integrations.broadcast import Group, Member
from test_broadcast_groups import slow_client, wait_for

pytestmark = pytest.mark.anyio

uvicorn = pytest.importorskip("uvicorn")
starlette_routing = pytest.importorskip("starlette.routing")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


@contextlib.asynccontextmanager
async def uvicorn_app(group: Group, members: list[Member], ws_impl: str) -> AsyncIterator[str]:
    from starlette.applications import Starlette
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        async with group.attach(websocket) as member:
            members.append(member)
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.receive_text()

    app = Starlette(routes=[starlette_routing.WebSocketRoute("/ws", endpoint)])
    with socket.socket() as sock:
        # Accepted connections inherit this: a client that stops reading backs the
        # server up after kilobytes, not the megabytes Linux allows on loopback.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_level="warning", ws=ws_impl)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await wait_for(lambda: server.started)
            yield f"ws://127.0.0.1:{port}/ws"
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("ws_impl", ["websockets-sansio", "wsproto"])
async def test_starlette_clients_get_everything_and_a_stuck_one_is_evicted(ws_impl: str) -> None:
    from websockets.asyncio.client import connect

    if ws_impl == "wsproto":
        pytest.importorskip("wsproto")
    group = Group("room", maxsize=8, overflow="close", send_timeout=5.0)
    members: list[Member] = []
    payload = "s" * 8192
    async with uvicorn_app(group, members, ws_impl) as url:
        stuck = await slow_client(url)
        healthy = [await connect(url) for _ in range(3)]
        await wait_for(lambda: group.members == 4)
        got: list[list[str | bytes]] = [[] for _ in healthy]

        async def read(ws: Any, out: list[str | bytes]) -> None:
            while len(out) < 200:
                out.append(await ws.recv())

        readers = [asyncio.create_task(read(ws, g)) for ws, g in zip(healthy, got, strict=True)]
        for i in range(200):
            await group.publish(f"{i:04d}{payload}")
            await asyncio.sleep(0.002)
        await asyncio.wait_for(asyncio.gather(*readers), 60)
        await wait_for(lambda: sum(group.evictions.values()) == 1)
        assert group.members == 3
        assert group.evictions["overflow"] == 1
        assert all([str(m)[:4] for m in g] == [f"{i:04d}" for i in range(200)] for g in got)
        stuck.writer.transport.resume_reading()  # type: ignore[attr-defined]
        assert await stuck.close_code() == 1013
        stuck.abort()
        for ws in healthy:
            await ws.close()
        await wait_for(lambda: group.members == 0)
    await group.aclose()
