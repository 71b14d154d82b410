"""``Broadcast``: publish to channels, subscribe with bounded queues, across processes.

This module owns the broadcast's lifecycle (connect, disconnect), the channel table
(who listens to what in this process), and local delivery: a publish hands the message
to every local subscriber and group at once, without waiting for any reader (except
subscribers that chose ``overflow="block"``), then the backplane carries it to other
processes. The Redis specifics live in :mod:`._redis`; connections of groups in
:mod:`._group`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from loopguard import metrics

from .._queue import Overflow, QueueClosed, check_bounds
from . import _observed
from ._redis import RedisBackplane, require_redis
from ._subscriber import Subscriber
from ._types import BroadcastStats, Delivery, Event
from ._url import parse_url

if TYPE_CHECKING:
    from ._group import Group, GroupOverflow

__all__ = ["Broadcast"]

_State = Literal["new", "connected", "disconnected"]


def message_size(message: object) -> int:
    """Size of a message in bytes (UTF-8 for text); ``TypeError`` for anything else."""
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, str):
        return len(message) if message.isascii() else len(message.encode())
    raise TypeError(
        f"message must be str or bytes, got {type(message).__name__} "
        "(serialize it first, e.g. json.dumps(...))"
    )


def check_channel(channel: object) -> str:
    """A channel name is a non-empty str."""
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, got {type(channel).__name__}")
    if not channel:
        raise ValueError("channel must not be empty")
    return channel


class Broadcast:
    """Publish/subscribe on named channels, in one process or across many through Redis.

    A drop-in for encode/broadcaster's ``Broadcast`` (same URL, ``connect()``,
    ``disconnect()``, ``publish()``, ``subscribe()``), with bounded subscriber queues,
    WebSocket groups, reconnects and metrics.

    Args:
        url: ``"memory://"`` (this process only) or ``"redis://HOST:PORT[/DB]"``
            (``"rediss://"`` for TLS; a password goes in the URL and never in messages).
        connect_timeout: How long ``connect()`` keeps retrying an unreachable Redis
            before it raises :class:`BackplaneUnavailable`.
        send_limit: Most WebSocket sends in flight at once across every group of this
            broadcast.

    Raises:
        ValueError: Unknown scheme or malformed URL (the message names it), or a bad
            ``connect_timeout``/``send_limit``.
        TypeError: ``url`` is not a string.
        ImportError: A Redis URL, and redis-py is not installed.
    """

    def __init__(self, url: str, *, connect_timeout: float = 10.0, send_limit: int = 256) -> None:
        self._url = parse_url(url)
        if self._url.scheme != "memory":
            require_redis(self._url.safe)
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        if isinstance(send_limit, bool) or not isinstance(send_limit, int) or send_limit < 1:
            raise ValueError(f"send_limit must be an int >= 1, got {send_limit!r}")
        self._connect_timeout = connect_timeout
        self.send_limit = send_limit
        self.stats = BroadcastStats()
        self._state: _State = "new"
        self._backplane: RedisBackplane | None = None
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._groups: dict[str, set[Group]] = {}
        self._listening: set[str] = set()
        self._lock = asyncio.Lock()
        self._limit: asyncio.Semaphore | None = None
        _observed.track(self)

    def __repr__(self) -> str:
        return f"Broadcast({self._url.safe!r}) [{self._state}]"

    @property
    def url(self) -> str:
        """The URL, with any password replaced by ``***``."""
        return self._url.safe

    @property
    def connected(self) -> bool:
        """Whether ``connect()`` succeeded and ``disconnect()`` was not called since."""
        return self._state == "connected"

    # -- lifecycle -------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to the backplane (for Redis: retry up to ``connect_timeout``).

        Calling it again while connected does nothing.

        Raises:
            BackplaneUnavailable: Redis could not be reached; the message names the URL.
        """
        if self._state == "connected":
            return
        if self._url.scheme != "memory":
            backplane = RedisBackplane(
                self._url, self._receive, self.stats, connect_timeout=self._connect_timeout
            )
            await backplane.start()
            self._backplane = backplane
        self._state = "connected"

    async def disconnect(self) -> None:
        """End every subscription and group, and close the backplane connections.

        Subscribers' ``async for`` loops stop after the messages already queued; the
        connections of groups are detached (not closed: their handlers own them).
        """
        if self._state != "connected":
            self._state = "disconnected"
            return
        self._state = "disconnected"
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber._end()
        groups = [g for gs in self._groups.values() for g in gs]
        self._subscribers.clear()
        self._groups.clear()
        self._listening.clear()
        for group in groups:
            await group.aclose()
        backplane, self._backplane = self._backplane, None
        if backplane is not None:
            await backplane.stop()

    async def __aenter__(self) -> Broadcast:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    def _check_connected(self, what: str) -> None:
        if self._state == "connected":
            return
        if self._state == "new":
            raise RuntimeError(
                f"{what} on {self!r}: call `await broadcast.connect()` first "
                "(or use `async with Broadcast(url) as broadcast:`)"
            )
        raise RuntimeError(f"{what} on {self!r}: it was disconnected")

    # -- publishing ------------------------------------------------------------------

    async def publish(self, channel: str, message: str | bytes) -> Delivery:
        """Send a message to every subscriber and group of the channel, in every process.

        Never waits for a reader: each local subscriber and connection gets the message
        in its bounded queue, or its overflow policy applies (subscribers created with
        ``overflow="block"`` are the exception: publish waits for room in their queue).
        With Redis, the message goes to Redis first; if Redis cannot take it nobody
        gets it and :class:`BackplaneUnavailable` is raised, so retrying is safe.

        Args:
            channel: The channel.
            message: ``str`` or ``bytes``; subscribers receive the same type.

        Returns:
            What happened in this process: how many local subscribers and connections
            got it, and how many drops and evictions it caused.

        Raises:
            TypeError: The message is not ``str``/``bytes``, or the channel not ``str``.
            RuntimeError: Not connected (before ``connect()`` or after ``disconnect()``).
            BackplaneUnavailable: Redis is unreachable (an outage in progress).
        """
        check_channel(channel)
        size = message_size(message)
        self._check_connected("publish()")
        if self._backplane is not None:
            await self._backplane.publish(channel, message)
        self.stats.published += 1
        return await self._deliver(channel, message, size)

    async def _receive(self, channel: str, message: str | bytes) -> None:
        # From the backplane: another process's message (own echoes are filtered out).
        await self._deliver(channel, message, message_size(message))

    async def _deliver(self, channel: str, message: str | bytes, size: int) -> Delivery:
        started = time.perf_counter()
        event = Event(channel, message)
        to_subscribers = Delivery()
        blocking: list[Subscriber] = []
        subscribers = self._subscribers.get(channel)
        if subscribers:
            for subscriber in tuple(subscribers):
                if subscriber.overflow == "block":
                    blocking.append(subscriber)
                else:
                    self._offer(subscriber, event, size, to_subscribers)
        to_connections = Delivery()
        groups = self._groups.get(channel)
        if groups:
            for group in tuple(groups):
                to_connections.add(await group.fan_out(message, size))
        for subscriber in blocking:
            # Documented: a "block" subscriber makes publish (and, with Redis, this
            # process's reader) wait for room in its queue.
            with contextlib.suppress(QueueClosed):
                if await subscriber._queue.put(event, size):
                    to_subscribers.delivered += 1
        if subscribers:
            too_large = sum(
                1
                for s in subscribers
                if s._queue.max_bytes is not None and size > s._queue.max_bytes
            )
            _observed.count_subscriber_delivery(to_subscribers, too_large=too_large)
        metrics.record(metrics.BROADCAST_FANOUT_DURATION, time.perf_counter() - started)
        to_subscribers.add(to_connections)
        return to_subscribers

    def _offer(self, subscriber: Subscriber, event: Event, size: int, report: Delivery) -> None:
        queue = subscriber._queue
        dropped = queue.dropped
        try:
            queued = queue.put_nowait(event, size)
        except QueueClosed:
            return
        report.dropped += queue.dropped - dropped
        if queued:
            report.delivered += 1
        elif queue.overflowed is not None:
            self._subscribers[event.channel].discard(subscriber)
            subscriber._end()
            report.evicted += 1
            metrics.record(
                metrics.BROADCAST_EVICTIONS,
                1,
                {
                    "broadcast.eviction.target": "subscriber",
                    "broadcast.eviction.reason": queue.overflowed,
                },
            )

    # -- subscribing -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        channel: str,
        *,
        maxsize: int = 1024,
        overflow: Overflow = "drop_oldest",
        max_bytes: int | None = None,
    ) -> AsyncIterator[Subscriber]:
        """Listen to a channel for the duration of an ``async with`` block.

        Args:
            channel: The channel.
            maxsize: Most messages waiting to be read (>= 1).
            overflow: When the queue is full: ``"drop_oldest"`` (default: the oldest
                waiting message makes room), ``"drop_newest"`` (the new one is
                dropped), ``"close"`` (the subscription ends; iteration raises
                :class:`SubscriberOverflow` once the queued messages are read) or
                ``"block"`` (publish waits for room: a subscriber that stops reading
                then stalls every publish to its channel, and with Redis every message
                this process receives; use it only where losing a message is worse).
            max_bytes: Most bytes waiting (UTF-8 size of text), or ``None``. A message
                larger than this alone is dropped as ``"too_large"``.

        Yields:
            The :class:`Subscriber`.

        Raises:
            ValueError: A bound or the policy is invalid (the message names which).
            RuntimeError: Not connected.
        """
        check_channel(channel)
        check_bounds(maxsize, max_bytes, overflow)
        self._check_connected("subscribe()")
        subscriber = Subscriber(channel, maxsize=maxsize, max_bytes=max_bytes, overflow=overflow)
        self._subscribers.setdefault(channel, set()).add(subscriber)
        try:
            await self._listen(channel)
            yield subscriber
        finally:
            subscriber._end(discard=True)
            listeners = self._subscribers.get(channel)
            if listeners is not None:
                listeners.discard(subscriber)
                if not listeners:
                    del self._subscribers[channel]
            await self._listen(channel)

    @contextlib.asynccontextmanager
    async def group(
        self,
        channel: str,
        *,
        maxsize: int = 32,
        max_bytes: int | None = 1 << 20,
        overflow: GroupOverflow = "close",
        send_timeout: float = 10.0,
    ) -> AsyncIterator[Group]:
        """A group of WebSocket connections that receives every message of a channel.

        Attach connections with ``async with group.attach(websocket):``; a
        ``publish`` on the channel, from any process, is sent to each of them.

        Args:
            channel: The channel.
            maxsize: Most messages waiting to be sent, per connection (>= 1).
            max_bytes: Most bytes waiting per connection, or ``None``.
            overflow: When a connection's queue is full: ``"close"`` (default: evict
                it, closing with 1013, or 1009 for a message over ``max_bytes``),
                ``"drop_oldest"`` or ``"drop_newest"``. ``"block"`` is refused: no
                connection may hold up a publish.
            send_timeout: Seconds one send may take before the connection is evicted.

        Yields:
            The :class:`Group`.
        """
        from ._group import Group

        check_channel(channel)
        self._check_connected("group()")
        if self._limit is None:
            self._limit = asyncio.Semaphore(self.send_limit)
        room = Group(
            channel,
            maxsize=maxsize,
            max_bytes=max_bytes,
            overflow=overflow,
            send_timeout=send_timeout,
            limit=self._limit,
        )
        self._groups.setdefault(channel, set()).add(room)
        try:
            await self._listen(channel)
            yield room
        finally:
            groups = self._groups.get(channel)
            if groups is not None:
                groups.discard(room)
                if not groups:
                    del self._groups[channel]
            await room.aclose()
            await self._listen(channel)

    async def _listen(self, channel: str) -> None:
        """Make the backplane subscription of a channel match its local listeners."""
        if self._url.scheme == "memory":
            return
        async with self._lock:
            backplane = self._backplane
            if backplane is None:  # disconnect() meanwhile
                return
            wanted = channel in self._subscribers or channel in self._groups
            if wanted and channel not in self._listening:
                self._listening.add(channel)
                await backplane.subscribe(channel)
            elif not wanted and channel in self._listening:
                self._listening.discard(channel)
                await backplane.unsubscribe(channel)
