"""Guarded receive for ``websockets`` (its asyncio implementation): :func:`guard_receive`.

A thin adapter: it turns a ``websockets.asyncio`` server or client connection into the
receiver's transport and adds the guard's own keepalive: a ping every
``ping_interval`` seconds whose round trip is measured (``websocket.ping.duration``,
``inbox.ping_rtt``); no pong within ``ping_timeout`` closes the connection with 1011 and
says why (:class:`~loopguard.ConnectionClosed`, with the loop stall to blame if any).
"""

from __future__ import annotations

from collections.abc import Awaitable

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from ._queue import Overflow
from ._receiver import Inbox, Message, check_options, guard

__all__ = ["DEFAULT_PING_INTERVAL", "DEFAULT_PING_TIMEOUT", "Inbox", "guard_receive"]

#: Seconds between pings. With the timeout, a dead peer is found within 40 s: before a
#: load balancer's usual 60 s idle timeout (AWS ALB) drops a quiet connection.
DEFAULT_PING_INTERVAL = 20.0
#: Seconds to wait for a pong before closing with 1011.
DEFAULT_PING_TIMEOUT = 20.0


class _WebsocketsTransport:
    def __init__(self, connection: Connection, route: str | None) -> None:
        self._connection = connection
        self._keepalive = False
        self.route = route

    async def receive(self) -> Message | None:
        try:
            return await self._connection.recv()
        except ConnectionClosed as exc:
            sent = exc.sent
            # websockets' own keepalive closes with 1011 and no close frame from the peer.
            self._keepalive = sent is not None and sent.code == 1011 and exc.rcvd is None
            return None

    async def close(self, code: int, reason: str) -> None:
        await self._connection.close(code, reason)

    def closed_code(self) -> int | None:
        return self._connection.close_code

    def keepalive_closed(self) -> bool:
        return self._keepalive

    async def ping(self) -> Awaitable[object] | None:
        return await self._connection.ping()

    def abort(self) -> None:
        self._connection.transport.abort()


def guard_receive(
    connection: Connection,
    *,
    maxsize: int,
    overflow: Overflow = "block",
    max_bytes: int | None = None,
    idle_timeout: float | None = None,
    ping_interval: float | None = DEFAULT_PING_INTERVAL,
    ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
    route: str | None = None,
) -> Inbox:
    """Receive a ``websockets`` connection in a task of its own, into a bounded inbox.

    Works with server connections (the handler's argument under
    ``websockets.asyncio.server.serve``) and client ones (``websockets.asyncio.client
    .connect``)::

        async def handler(connection):
            async with guard_receive(connection, maxsize=100) as inbox:
                async for message in inbox:
                    await handle(message)

    The ``async for`` yields messages (``str`` or ``bytes``) in arrival order and ends,
    without an exception, when the connection closes, after the messages already
    queued. Leaving the block stops the receiver and the pinger; nothing is left
    running. Do not call ``connection.recv()`` yourself inside the block.

    The guard pings on its own schedule; ``websockets``' keepalive
    (``serve(ping_interval=...)``) may stay on or be turned off (``None``) to avoid two
    pings per interval.

    Args:
        connection: A ``websockets.asyncio`` connection.
        maxsize: Most messages queued at once (>= 1).
        overflow: ``"block"`` (stop reading while full: backpressure; note that a
            paused reader also leaves pongs unread, so a consumer more than
            ``ping_timeout`` behind is closed by keepalive), ``"drop_oldest"``,
            ``"drop_newest"`` or ``"close"`` (close with 1013 at once).
        max_bytes: Most bytes queued at once, or ``None``; a message over it is
            dropped as ``"too_large"`` (closed with 1009 under ``"close"``).
        idle_timeout: Close (1000) when no message arrived for this many seconds.
        ping_interval: Seconds between the guard's pings; ``None`` for none.
        ping_timeout: Seconds to wait for each pong before closing with 1011;
            ``None`` to wait for ever (RTT measured only).
        route: A route template or name for the metrics' ``http.route``.

    Returns:
        The :class:`Inbox`, to use as ``async with``.

    Raises:
        ValueError: An argument is invalid (the message names it).
        TypeError: ``connection`` is not a ``websockets.asyncio`` connection.
    """
    check_options(maxsize, max_bytes, overflow, idle_timeout, ping_interval, ping_timeout)
    if not isinstance(connection, Connection):
        raise TypeError(
            "connection must be a websockets.asyncio connection (server handler argument "
            f"or websockets.asyncio.client.connect()), got {type(connection).__name__}"
        )
    return guard(
        _WebsocketsTransport(connection, route),
        maxsize=maxsize,
        max_bytes=max_bytes,
        overflow=overflow,
        idle_timeout=idle_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
