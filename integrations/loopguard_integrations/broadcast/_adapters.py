"""Thin adapters from each WebSocket library to the two calls a group needs.

A group sends text or bytes and closes with a code; that is all it asks of a
connection. Starlette/FastAPI ``WebSocket`` objects, ``websockets`` connections (the
asyncio implementation and the legacy one) and any object with ``async send(message)``
and ``async close(code, reason)`` are accepted. Nothing here imports a framework: the
kind of a connection is told from its type's module and its methods.

``websockets`` connections also get a fast path: when a connection has nothing queued
and its socket buffer has room, the message is written at once with
``websockets.broadcast`` (one call for every such connection), without a task switch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

__all__ = ["Adapter", "adapt"]

# A connection whose transport buffer holds more than this is not written to directly:
# its message goes through its queue and writer, which waits for the buffer to drain.
_DIRECT_WRITE_LIMIT = 16 * 1024


class Adapter:
    """Any connection with ``async send(message)`` and ``async close(code, reason)``."""

    __slots__ = ("connection",)

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    async def send(self, message: str | bytes) -> None:
        """Send one message, waiting as the library does for its buffer to drain."""
        await self.connection.send(message)

    async def close(self, code: int, reason: str) -> None:
        """Close with a code and reason."""
        await self.connection.close(code, reason)

    def abort(self) -> None:
        """Drop the connection without a closing handshake, where the library can."""

    def ready(self) -> bool:
        """Whether a message can be written now, synchronously, without waiting."""
        return False

    @staticmethod
    def write_now(adapters: Sequence[Adapter], message: str | bytes) -> None:
        """Write a message at once to connections that are :meth:`ready`.

        Never called for adapters whose ``ready`` is always false.
        """
        raise NotImplementedError


class StarletteAdapter(Adapter):
    """Starlette's and FastAPI's ``WebSocket`` (any ASGI server)."""

    __slots__ = ()

    async def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            await self.connection.send_text(message)
        else:
            await self.connection.send_bytes(message)

    async def close(self, code: int, reason: str) -> None:
        await self.connection.close(code, reason)


class WebsocketsAdapter(Adapter):
    """A ``websockets`` server or client connection."""

    __slots__ = ("_open",)

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        from websockets.protocol import State

        self._open = State.OPEN

    def abort(self) -> None:
        transport = getattr(self.connection, "transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.abort()

    def ready(self) -> bool:
        connection = self.connection
        transport = connection.transport
        return (
            connection.state is self._open
            and transport is not None
            and transport.get_write_buffer_size() <= _DIRECT_WRITE_LIMIT
            and getattr(connection, "fragmented_send_waiter", None) is None
        )

    @staticmethod
    def write_now(adapters: Sequence[Adapter], message: str | bytes) -> None:
        import websockets

        websockets.broadcast([a.connection for a in adapters], message)


def adapt(connection: object) -> Adapter:
    """The adapter for a connection.

    Raises:
        TypeError: The object is not a WebSocket connection this module knows, nor has
            ``send`` and ``close`` methods.
    """
    module = type(connection).__module__ or ""
    if module.startswith("websockets.") and hasattr(connection, "transport"):
        return WebsocketsAdapter(connection)
    if hasattr(connection, "send_text") and hasattr(connection, "send_bytes"):
        return StarletteAdapter(connection)
    if callable(getattr(connection, "send", None)) and callable(getattr(connection, "close", None)):
        return Adapter(connection)
    raise TypeError(
        f"cannot attach a {type(connection).__name__}: expected a Starlette/FastAPI "
        "WebSocket, a websockets connection, or an object with async send(message) and "
        "close(code, reason)"
    )
