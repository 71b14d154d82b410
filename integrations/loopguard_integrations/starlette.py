"""Guarded receive for Starlette and FastAPI WebSockets: :func:`guard_receive`.

A thin adapter: it turns a Starlette ``WebSocket`` into the receiver's transport (ASGI
``websocket.receive`` messages in, ``websocket.disconnect`` as the end) and leaves
everything else to :mod:`._receiver`. ASGI has no ping message: keepalive pings are the
server's (uvicorn's ``--ws-ping-interval`` / ``--ws-ping-timeout``); when they close a
connection (1011) the guard explains it like its own closes.
"""

from __future__ import annotations

import contextlib
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from ._queue import Overflow
from ._receiver import Inbox, Message, check_options, guard

__all__ = ["Inbox", "guard_receive"]


class _StarletteTransport:
    def __init__(self, websocket: WebSocket, route: str | None) -> None:
        self._websocket = websocket
        self._code: int | None = None
        self.route = route

    async def receive(self) -> Message | None:
        message = await self._websocket.receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            data = message.get("bytes")
            return bytes(data) if data is not None else b""
        self._code = int(message.get("code") or 1005)
        return None

    async def close(self, code: int, reason: str) -> None:
        if self._websocket.application_state == WebSocketState.CONNECTED:
            await self._websocket.close(code, reason)

    def closed_code(self) -> int | None:
        return self._code

    def keepalive_closed(self) -> bool:
        # A server that passes its keepalive close on as 1011 says so; uvicorn passes
        # 1005/1006 (indistinguishable from a vanished peer).
        return self._code == 1011

    async def ping(self) -> None:
        return None


def _route_of(websocket: WebSocket) -> str | None:
    route: Any = websocket.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


def guard_receive(
    websocket: WebSocket,
    *,
    maxsize: int,
    overflow: Overflow = "block",
    max_bytes: int | None = None,
    idle_timeout: float | None = None,
    route: str | None = None,
) -> Inbox:
    """Receive a Starlette/FastAPI WebSocket in a task of its own, into a bounded inbox.

    Call it after ``await websocket.accept()``::

        async with guard_receive(websocket, maxsize=100, overflow="drop_oldest") as inbox:
            async for message in inbox:
                await handle(message)

    A receiver task reads the socket and queues each message (``str`` or ``bytes``);
    the ``async for`` takes them in arrival order and ends, without an exception,
    when the client disconnects or the connection is closed, after the messages
    already queued. Leaving the block (normally, by an exception or by cancellation)
    stops the receiver; nothing is left running. Do not call ``websocket.receive*``
    yourself inside the block. Sending (``websocket.send_*``) is yours as usual.

    Args:
        websocket: An accepted Starlette (or FastAPI) ``WebSocket``.
        maxsize: Most messages queued at once (>= 1).
        overflow: What happens when the queue is full: ``"block"`` (stop reading
            until there is room: the client is slowed by TCP backpressure),
            ``"drop_oldest"``, ``"drop_newest"``, or ``"close"`` (close with 1013
            "try again later" at once).
        max_bytes: Most bytes queued at once (UTF-8 size of text), or ``None``. A
            single message over it is dropped as ``"too_large"``; under
            ``overflow="close"`` the connection is closed with 1009.
        idle_timeout: Close the connection (1000) and end the stream when no message
            arrived for this many seconds; ``None`` for never.
        route: The route template for the metrics' ``http.route`` (default: the
            template of the matched Starlette/FastAPI route, never the raw path).

    Returns:
        The :class:`Inbox`, to use as ``async with``. Its ``delivered``,
        ``dropped``, ``drops`` and ``close_code`` can be read at any time.

    Raises:
        ValueError: An argument is invalid (the message names it).
        RuntimeError: The WebSocket is not accepted yet, or already closed.
    """
    check_options(maxsize, max_bytes, overflow, idle_timeout)
    if not isinstance(websocket, WebSocket):
        raise TypeError(
            f"websocket must be a starlette.websockets.WebSocket, got {type(websocket).__name__}"
        )
    if websocket.application_state != WebSocketState.CONNECTED:
        state = websocket.application_state.name.lower()
        hint = "call `await websocket.accept()` first" if state == "connecting" else "it is over"
        raise RuntimeError(
            f"guard_receive(websocket) needs an accepted WebSocket ({state}: {hint})"
        )
    if websocket.client_state == WebSocketState.DISCONNECTED:
        raise RuntimeError("guard_receive(websocket): the client has already disconnected")
    with contextlib.suppress(Exception):
        route = route or _route_of(websocket)
    return guard(
        _StarletteTransport(websocket, route),
        maxsize=maxsize,
        max_bytes=max_bytes,
        overflow=overflow,
        idle_timeout=idle_timeout,
    )
