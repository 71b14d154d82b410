"""``Group``: fan one message out to many WebSocket connections, none able to hold it up.

This module owns the members of a group (a room), each with a bounded send queue and
one writer task; the policy for a connection that falls behind (evict it, closing
with 1013, or drop messages); removal of a connection the moment its handler leaves;
and the counts of what each fan-out did. A fan-out (:meth:`Group.fan_out`) never waits
for a reader: it writes at once to connections with room in their socket buffer (where
the library allows it), queues for the others, and applies the policy to full queues,
in slices of a few milliseconds so that the loop keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Literal

from loopguard import metrics

from .._queue import BoundedQueue, QueueClosed, check_bounds
from . import _observed
from ._adapters import Adapter, adapt
from ._types import Delivery

__all__ = ["Group", "GroupOverflow", "Member"]

GroupOverflow = Literal["drop_oldest", "drop_newest", "close"]

_CLOSE_TIMEOUT = 5.0
# Longest a fan-out serves members before it lets the loop run.
_SLICE_SECONDS = 0.005
# Connections written at once between two looks at the clock.
_DIRECT_BATCH = 32
# Close codes (RFC 6455 and the IANA registry): message too big, try again later.
_CODE_TOO_BIG = 1009
_CODE_TRY_AGAIN_LATER = 1013
_EVICTION = {
    "overflow": (_CODE_TRY_AGAIN_LATER, "too slow: send queue full"),
    "too_large": (_CODE_TOO_BIG, "message too big"),
    "send_timeout": (_CODE_TRY_AGAIN_LATER, "too slow: send timed out"),
}


class Member:
    """One connection in a group: what ``async with group.attach(ws)`` gives.

    Attributes:
        connection: The connection as given to :meth:`Group.attach`.
        sent: Messages written to this connection so far.
        evicted: ``None``, or why the group evicted it (``"overflow"``, ``"too_large"``,
            ``"send_timeout"``).
    """

    __slots__ = (
        "__weakref__",
        "_adapter",
        "_busy",
        "_queue",
        "_writer",
        "connection",
        "evicted",
        "sent",
    )

    def __init__(self, connection: object, adapter: Adapter, queue: BoundedQueue[str | bytes]):
        self.connection = connection
        self.sent = 0
        self.evicted: str | None = None
        self._adapter = adapter
        self._queue = queue
        self._busy = False
        self._writer: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Messages queued for this connection, not written yet."""
        return len(self._queue)

    @property
    def dropped(self) -> int:
        """Messages dropped for this connection (its queue was full, or at removal)."""
        return self._queue.dropped


class Group:
    """Connections that each receive every message sent to the group.

    Use :meth:`Broadcast.group` to have a channel's messages (from every process) sent
    to the group, or create one directly for a single process and call
    :meth:`publish`.

    Args:
        name: A name for messages and ``repr`` (the channel, for broadcast groups).
        maxsize: Most messages waiting to be sent, per connection (>= 1).
        max_bytes: Most bytes waiting per connection (UTF-8 size of text), or ``None``.
        overflow: When a connection's queue is full: ``"close"`` (evict: close it with
            1013, or 1009 for a single message over ``max_bytes``), ``"drop_oldest"``
            or ``"drop_newest"``.
        send_timeout: Seconds one send may take before the connection is evicted.
        send_limit: Most sends in flight at once (ignored when ``limit`` is given).
        limit: A semaphore shared with other groups (one limit for the process).

    Attributes:
        name: The group's name.
        sent: Messages written to connections so far.
        drops: Messages dropped so far, by reason (``"overflow"``, ``"too_large"``,
            ``"discarded"``: queued when the connection left).
        evictions: Connections evicted so far, by reason.
        disconnects: Connections removed because a send found them closed.

    Raises:
        ValueError: A bound, the policy or the timeout is invalid (the message names it).
    """

    def __init__(
        self,
        name: str,
        *,
        maxsize: int = 32,
        max_bytes: int | None = 1 << 20,
        overflow: GroupOverflow = "close",
        send_timeout: float = 10.0,
        send_limit: int = 256,
        limit: asyncio.Semaphore | None = None,
    ) -> None:
        check_bounds(maxsize, max_bytes, overflow)
        if overflow not in ("close", "drop_oldest", "drop_newest"):
            raise ValueError(
                "overflow must be 'close', 'drop_oldest' or 'drop_newest' for a group: "
                "'block' would let one slow connection hold up every publish"
            )
        if not send_timeout > 0:
            raise ValueError(f"send_timeout must be > 0 seconds, got {send_timeout!r}")
        if isinstance(send_limit, bool) or not isinstance(send_limit, int) or send_limit < 1:
            raise ValueError(f"send_limit must be an int >= 1, got {send_limit!r}")
        self.name = name
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.overflow: GroupOverflow = overflow
        self.send_timeout = send_timeout
        self.sent = 0
        self.drops: dict[str, int] = {"overflow": 0, "too_large": 0, "discarded": 0}
        self.evictions: dict[str, int] = dict.fromkeys(_EVICTION, 0)
        self.disconnects = 0
        self._limit = limit if limit is not None else asyncio.Semaphore(send_limit)
        self._members: dict[Member, None] = {}  # insertion-ordered set
        self._closers: set[asyncio.Task[None]] = set()
        self._fanning = asyncio.Lock()
        self._closed = False
        _observed.track(self)

    def __repr__(self) -> str:
        return f"<Group {self.name!r} members={len(self._members)} overflow={self.overflow!r}>"

    def __len__(self) -> int:
        return len(self._members)

    @property
    def members(self) -> int:
        """Connections attached now."""
        return len(self._members)

    @property
    def pending(self) -> int:
        """Messages queued for the members now, not written yet."""
        return sum(len(m._queue) for m in tuple(self._members))

    # -- membership ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def attach(self, websocket: object) -> AsyncIterator[Member]:
        """Make a connection a member while the ``async with`` block runs.

        The connection is removed the moment the block exits (its handler returned,
        raised or was cancelled): nothing of it is kept. Accept the connection before
        attaching it; run the receive loop inside the block.

        Args:
            websocket: A Starlette/FastAPI ``WebSocket``, a ``websockets`` connection,
                or any object with ``async send(message)`` and ``async close(code,
                reason)``.

        Yields:
            The :class:`Member`.

        Raises:
            TypeError: The object is not a connection (see above).
            RuntimeError: The group is closed.
        """
        if self._closed:
            raise RuntimeError(f"attach() on closed {self!r}")
        adapter = adapt(websocket)
        queue: BoundedQueue[str | bytes] = BoundedQueue(
            maxsize=self.maxsize,
            max_bytes=self.max_bytes,
            overflow=self.overflow,
            on_drop=self._dropped,
        )
        member = Member(websocket, adapter, queue)
        member._writer = asyncio.create_task(self._write(member), name="loopguard-group-writer")
        self._members[member] = None
        try:
            yield member
        finally:
            await self._remove(member)

    async def _remove(self, member: Member) -> None:
        self._members.pop(member, None)
        member._queue.discard()
        member._queue.close()
        writer, member._writer = member._writer, None
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _dropped(self, message: str | bytes, reason: str) -> None:
        self.drops[reason] += 1

    # -- fan-out ---------------------------------------------------------------------

    async def publish(self, message: str | bytes) -> Delivery:
        """Send a message to every member of this group, in this process only.

        Returns as soon as every member has it queued or written (see
        :meth:`fan_out`); never waits for a member to read.

        Raises:
            TypeError: The message is not ``str`` or ``bytes``.
        """
        from ._broadcast import message_size

        started = time.perf_counter()
        report = await self.fan_out(message, message_size(message))
        metrics.record(metrics.BROADCAST_FANOUT_DURATION, time.perf_counter() - started)
        return report

    async def fan_out(self, message: str | bytes, size: int) -> Delivery:
        """Give a message to every member, without waiting for any of them to read.

        A member with nothing queued whose socket buffer has room gets it written at
        once (``websockets`` connections); the others get it queued for their writer.
        A full queue applies the group's policy. Members are served in slices of a few
        milliseconds with the loop let run between them, so a fan-out to thousands of
        connections never holds the loop for long; fan-outs of one group run one at a
        time, so every member gets messages in publish order.

        Args:
            message: The message.
            size: Its size in bytes (for ``max_bytes``).

        Returns:
            How many members got it, how many messages were dropped, how many members
            were evicted.
        """
        report = Delivery()
        if self._closed or not self._members:
            return report
        async with self._fanning:
            members = list(self._members)
            start = 0
            while start < len(members):
                end = self._slice(members, start, message, size, report)
                start = end
                if start < len(members):
                    await asyncio.sleep(0)  # let the loop run between slices
        _observed.count_connection_delivery(report, too_large=self._too_large(size))
        return report

    def _slice(
        self, members: list[Member], start: int, message: str | bytes, size: int, report: Delivery
    ) -> int:
        """Serve members from ``start`` for about one slice of time; return where it stopped.

        The clock is read after every batch of direct writes (the costly part: a frame
        built and a system call per connection) and every 64 queued members.
        """
        deadline = time.perf_counter() + _SLICE_SECONDS
        direct: list[Member] = []
        evict: list[Member] = []
        index, end = start, len(members)
        while index < end:
            member = members[index]
            index += 1
            queue = member._queue
            if queue.closed:
                continue
            if not member._busy and not queue and member._adapter.ready():
                direct.append(member)
                if len(direct) == _DIRECT_BATCH:
                    self._write_now(direct, message, size, report)
                    direct = []
                    if time.perf_counter() > deadline:
                        break
                continue
            dropped = queue.dropped
            if queue.put_nowait(message, size):
                report.delivered += 1
            elif queue.overflowed is not None:
                evict.append(member)
            report.dropped += queue.dropped - dropped
            if (index - start) % 64 == 0 and time.perf_counter() > deadline:
                break
        if direct:
            self._write_now(direct, message, size, report)
        for member in evict:
            self._evict(member, member._queue.overflowed or "overflow")
        report.evicted += len(evict)
        return index

    def _write_now(
        self, members: list[Member], message: str | bytes, size: int, report: Delivery
    ) -> None:
        """Write to members whose socket buffer has room, in one library call."""
        adapters = [member._adapter for member in members]
        try:
            type(adapters[0]).write_now(adapters, message)
        except Exception:  # a library error: fall back to each member's writer
            for member in members:
                with contextlib.suppress(QueueClosed):
                    member._queue.put_nowait(message, size)
        else:
            for member in members:
                member.sent += 1
            self.sent += len(members)
        report.delivered += len(members)

    def _too_large(self, size: int) -> bool:
        return self.max_bytes is not None and size > self.max_bytes

    # -- writing and evicting ----------------------------------------------------------

    async def _write(self, member: Member) -> None:
        queue, adapter = member._queue, member._adapter
        while True:
            try:
                message = await queue.get()
            except QueueClosed:
                return
            member._busy = True
            try:
                async with self._limit:
                    await asyncio.wait_for(adapter.send(message), self.send_timeout)
            except asyncio.TimeoutError:
                self._evict(member, "send_timeout")
                return
            except Exception:
                # The connection is gone (closed by the client, the server, keepalive):
                # leave the group now rather than when the handler notices.
                self.disconnects += 1
                self._members.pop(member, None)
                queue.discard()
                queue.close()
                return
            finally:
                member._busy = False
            member.sent += 1
            self.sent += 1

    def _evict(self, member: Member, reason: str) -> None:
        if member.evicted is not None:
            return
        member.evicted = reason
        self._members.pop(member, None)
        member._queue.discard()
        member._queue.close()
        self.evictions[reason] = self.evictions.get(reason, 0) + 1
        metrics.record(
            metrics.BROADCAST_EVICTIONS,
            1,
            {"broadcast.eviction.target": "connection", "broadcast.eviction.reason": reason},
        )
        writer = member._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
        code, text = _EVICTION.get(reason, _EVICTION["overflow"])
        closer = asyncio.create_task(self._close(member._adapter, code, text))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    @staticmethod
    async def _close(adapter: Adapter, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(adapter.close(code, reason), _CLOSE_TIMEOUT)
        except Exception:
            adapter.abort()

    async def aclose(self) -> None:
        """Detach every member (their connections stay open) and refuse new ones."""
        self._closed = True
        for member in list(self._members):
            await self._remove(member)
        if self._closers:
            await asyncio.gather(*self._closers, return_exceptions=True)
