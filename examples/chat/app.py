"""A chat room that works across uvicorn workers (and machines) through Redis.

Run it with two workers against a Redis server:

    CHAT_BROADCAST_URL=redis://127.0.0.1:6379/0 uvicorn app:app --app-dir examples/chat --workers 2

Every WebSocket client joins the room; what one client sends reaches every client,
whichever worker serves it. The first message each client receives says which worker
process it is talking to.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket
from loopguard_integrations.broadcast import BackplaneUnavailable, Broadcast, Group
from loopguard_integrations.starlette import guard_receive

BROADCAST_URL = os.environ.get("CHAT_BROADCAST_URL", "redis://127.0.0.1:6379/0")
CHANNEL = "chat"

broadcast = Broadcast(BROADCAST_URL)
rooms: dict[str, Group] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One Broadcast per worker process: one Redis pub/sub connection, and one group
    # that sends the channel's messages to this worker's connections.
    async with broadcast, broadcast.group(CHANNEL, maxsize=64, overflow="close") as room:
        rooms[CHANNEL] = room
        yield
        rooms.clear()


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, object]:
    room = rooms[CHANNEL]
    return {
        "pid": os.getpid(),
        "members": room.members,
        "sent": room.sent,
        "evictions": room.evictions,
        "lost": broadcast.stats.lost,
        "reconnects": broadcast.stats.reconnects,
    }


@app.websocket("/ws/{name}")
async def chat(websocket: WebSocket, name: str) -> None:
    await websocket.accept()
    await websocket.send_text(json.dumps({"event": "welcome", "pid": os.getpid()}))
    # Sending: the room's bounded writer for this connection. Receiving: a bounded
    # inbox that a slow publish can never turn into an unbounded backlog.
    async with (
        rooms[CHANNEL].attach(websocket),
        guard_receive(websocket, maxsize=100, overflow="drop_oldest") as inbox,
    ):
        async for text in inbox:
            if not isinstance(text, str):
                continue
            message = {"event": "message", "from": name, "pid": os.getpid(), "text": text}
            try:
                await broadcast.publish(CHANNEL, json.dumps(message))
            except BackplaneUnavailable:
                await websocket.send_text(json.dumps({"event": "error", "text": "retry"}))
