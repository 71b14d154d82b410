"""The guarded WebSocket receiver, framework-free: receive fast, process separately.

This module owns :class:`Inbox` and :func:`guard`, which the framework adapters
(:mod:`.starlette`, :mod:`.websockets`) wrap. A *transport* (:class:`Transport`) is the
little an adapter provides: receive one message, close with a code, optionally send a
ping. Everything else is here, once:

- a **receiver task** that only receives and enqueues into a
  :class:`~._queue.BoundedQueue`, so the connection is read promptly however slow the
  consumer is (under ``overflow="block"`` it stops reading while the queue is full:
  backpressure through the transport). While the consumer keeps up, the consumer reads
  *directly* instead and the receiver task sleeps: a message then costs what it costs
  unguarded, with no second task wake-up. A consumer busy for longer than
  :data:`~._handover.GRACE` (since it last waited for a message) hands reading to the
  receiver task (:mod:`._handover`); the receiver hands it back when it finds the
  consumer waiting on an empty queue. Either way every message goes through the same
  queue accounting;
- the **overflow policy** and the **close semantics**: a disconnect ends the stream after
  what is already queued; closing for overflow (1013), size (1009), keepalive (1011) or
  idle timeout never waits behind the bound (the queue is closed at once, the closing
  handshake runs in its own task while the receiver keeps reading);
- a **keeper task** (only when pings or an idle timeout are asked for) that pings and
  times the pong, and closes an idle connection;
- the **account**: every message received is delivered, dropped with a reason, or still
  queued; :class:`~loopguard.ConnectionClosed` says why a connection was closed;
- the **metrics**: time in queue and process duration are recorded per message (a
  random share of them above :data:`~._wsmetrics.HISTOGRAM_BUDGET` messages a second);
  queue size, capacity, lag, messages and active connections are observed at
  collection time from the registry of live inboxes, so they cost nothing per message.

Leaving the ``async with`` block (normally, by an exception or by cancellation) cancels
and awaits both tasks: nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, TypeAlias

import loopguard
import loopguard.metrics as m
from loopguard.events import ConnectionClosed

from ._handover import IDLE
from ._handover import handover as _handover
from ._queue import BoundedQueue, Overflow, QueueClosed, check_bounds
from ._wsmetrics import registry as _registry
from ._wsmetrics import sampler as _sampler

__all__ = [
    "CLOSE_CODES",
    "Inbox",
    "Message",
    "Transport",
    "active_connections",
    "check_options",
    "guard",
]

logger = logging.getLogger("loopguard")

Message: TypeAlias = str | bytes
"""One WebSocket message: ``str`` for a text frame, ``bytes`` for a binary one."""

#: Close code for each reason the guard closes a connection itself.
CLOSE_CODES = {"overflow": 1013, "too_large": 1009, "keepalive": 1011, "idle": 1000}
_CLOSE_TEXT = {
    "overflow": "try again later: receive queue full",
    "too_large": "message too big",
    "keepalive": "keepalive ping timeout",
    "idle": "idle timeout",
}
# Without pings of its own, the guard looks this far back for a stall to blame (the
# default ping interval + timeout of uvicorn and websockets).
_DEFAULT_WINDOW = 40.0
# Seconds the end of the block waits for a close the guard started to be sent and answered.
_CLOSE_GRACE = 1.0


class Transport(Protocol):
    """What an adapter provides: one connection, seen as messages and a close.

    An adapter may also provide ``abort()``: drop the connection without a closing
    handshake, so that a pending :meth:`receive` ends. With it, a consumer that keeps up
    reads directly also when the guard has timeouts of its own (pings, idle): a close
    for a timeout then ends a pending read within a second even if the peer never
    answers.
    """

    route: str | None
    """Route template of the connection (a metric attribute), or ``None``."""

    async def receive(self) -> Message | None:
        """Wait for the next message; ``None`` once the connection is closed."""

    async def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with ``code``."""

    def closed_code(self) -> int | None:
        """The close code, once :meth:`receive` returned ``None`` (1006: no close frame)."""

    def keepalive_closed(self) -> bool:
        """Whether the connection was closed by a keepalive timeout on this side."""

    async def ping(self) -> Awaitable[object] | None:
        """Send a ping and return a waiter for its pong, or ``None`` if unsupported."""


def check_options(
    maxsize: int,
    max_bytes: int | None,
    overflow: str,
    idle_timeout: float | None,
    ping_interval: float | None = None,
    ping_timeout: float | None = None,
) -> None:
    """Refuse invalid options at the call, naming the argument (``ValueError``)."""
    check_bounds(maxsize, max_bytes, overflow)
    for name, value in (
        ("idle_timeout", idle_timeout),
        ("ping_interval", ping_interval),
        ("ping_timeout", ping_timeout),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
        ):
            raise ValueError(f"{name} must be None or a number > 0, got {value!r}")


def _nbytes(message: Message) -> int:
    if isinstance(message, str):
        # UTF-8 size without encoding when the text is ASCII (a flag check in CPython).
        return len(message) if message.isascii() else len(message.encode())
    return len(message)


class Inbox:
    """The messages of one guarded connection, in arrival order, minus drops.

    ``async for message in inbox`` yields each message (``str`` or ``bytes``) and ends
    without an exception when the peer disconnects or the connection is closed, after
    the messages already queued. ``async for batch in inbox.batches(n, wait)`` yields
    lists instead. The counters can be read at any time, also after the block.

    Attributes:
        close_code: The connection's close code once it closed, else ``None``.
        close_reason: Why the stream ended: ``"peer"`` (the peer closed or vanished),
            ``"keepalive"``, ``"overflow"``, ``"too_large"``, ``"idle"``, ``"error"``
            (the transport failed), or ``None`` while open.
        ping_rtt: The last measured ping round trip in seconds, when the adapter
            pings.
        route: The route template used as the metrics' ``http.route``.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        maxsize: int,
        max_bytes: int | None = None,
        overflow: Overflow = "block",
        idle_timeout: float | None = None,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
    ) -> None:
        check_options(maxsize, max_bytes, overflow, idle_timeout, ping_interval, ping_timeout)
        self.route = transport.route
        self._attrs: dict[str, str] = {"http.route": self.route} if self.route else {}
        self._transport = transport
        self._queue: BoundedQueue[Message] = BoundedQueue(
            maxsize=maxsize, max_bytes=max_bytes, overflow=overflow, on_get=self._on_get
        )
        self._sized = max_bytes is not None
        self._idle_timeout = idle_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.ping_rtt: float | None = None
        self._late = 0  # received after the guard closed the connection: dropped
        self._state = "new"  # "open" inside the block, "ended" after it
        self._closing: str | None = None
        self._error: BaseException | None = None
        self._last_message = time.monotonic()
        self._receiver: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._finished = False
        self._sampled = False  # the last message handed out has its histograms recorded
        # Who reads the transport: the consumer itself ("direct") or the receiver task
        # ("background"); see _handover. Direct reading needs a way to end a consumer's
        # pending read when the guard closes the connection for a timeout: no keeper, or
        # a transport that can abort.
        self._direct_ok = (idle_timeout is None and ping_interval is None) or callable(
            getattr(transport, "abort", None)
        )
        self._mode = "direct" if self._direct_ok else "background"
        self._reading = False  # the consumer is inside transport.receive()
        self._waiting = False  # the consumer waits on an empty queue
        self._ended = False  # the transport returned its end (or failed)
        self._park: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    # -- what users read -------------------------------------------------------------

    @property
    def delivered(self) -> int:
        """Messages handed to the consumer so far."""
        return self._queue.delivered

    @property
    def dropped(self) -> int:
        """Messages dropped so far, every reason (see :attr:`drops`)."""
        return self._queue.dropped + self._late

    @property
    def drops(self) -> dict[str, int]:
        """Dropped messages by reason.

        ``"overflow"`` (the policy dropped one), ``"too_large"`` (over ``max_bytes``),
        ``"discarded"`` (still queued when the block ended), ``"closed"`` (arrived
        after the guard closed the connection).
        """
        return {**self._queue.drops, "closed": self._late}

    @property
    def maxsize(self) -> int:
        """Most messages queued at once."""
        return self._queue.maxsize

    @property
    def max_bytes(self) -> int | None:
        """Most bytes queued at once, or ``None``."""
        return self._queue.max_bytes

    @property
    def overflow(self) -> str:
        """The overflow policy."""
        return self._queue.overflow

    @property
    def lag(self) -> float:
        """Age in seconds of the oldest message still queued (0 when empty)."""
        oldest = self._queue.oldest_since
        return 0.0 if oldest is None else max(0.0, time.monotonic() - oldest)

    def __len__(self) -> int:
        """Messages queued now."""
        return len(self._queue)

    def __repr__(self) -> str:
        return (
            f"<Inbox {self._state} queued={len(self)}/{self.maxsize} overflow={self.overflow!r} "
            f"delivered={self.delivered} dropped={self.dropped} close_code={self.close_code}>"
        )

    # -- consuming -------------------------------------------------------------------

    def _usable(self) -> None:
        if self._state != "open":
            raise RuntimeError(
                "this inbox is used outside its `async with guard_receive(...)` block; "
                "iterate it inside the block (its messages end with the block)"
            )

    def __aiter__(self) -> AsyncIterator[Message]:
        self._usable()
        return self._messages()

    async def _messages(self) -> AsyncIterator[Message]:
        queue = self._queue
        record = m.record
        attrs = self._attrs
        loop = asyncio.get_running_loop()
        away = _handover(loop)
        while True:
            message: Message | None
            idle = True
            if self._reading:
                # Another task iterates this inbox too: only the receiver task reads
                # from now on (it starts once the other task's read is over).
                self._direct_ok = False
                self._to_background()
            if self._mode == "direct" and not queue.closed and not len(queue):
                asked = time.perf_counter()
                message = await self._read_direct()
                if message is None:
                    continue
                idle = time.perf_counter() - asked >= IDLE
            else:
                if self._closing is not None:
                    self._to_background()  # late messages are still read, counted
                self._waiting = not len(queue)
                try:
                    message = await queue.get()
                except QueueClosed:
                    break
                finally:
                    self._waiting = False
            if self._mode == "direct":
                away.leave(self, loop, idle=idle)
            if self._sampled:
                taken = time.perf_counter()
                yield message
                record(m.WEBSOCKET_PROCESS_DURATION, time.perf_counter() - taken, attrs)
            else:
                yield message
            if self._state != "open":
                self._usable()
        self._raise_error()

    async def _read_direct(self) -> Message | None:
        """Read one message in the consumer's task; ``None`` when none is to be handed out."""
        self._reading = True
        try:
            message = await self._transport.receive()
        except asyncio.CancelledError:
            # The consumer may not come back soon (a timeout around its `anext`): the
            # receiver task reads meanwhile unless it does within the grace.
            if self._state == "open" and self._loop is not None:
                _handover(self._loop).leave(self, self._loop, idle=True)
            raise
        except Exception as exc:  # the transport failed: end the stream, tell the consumer
            self._failed(exc)
            return None
        finally:
            self._reading = False
            if self._mode == "background":  # handed over during the read
                self._to_background()
        if message is None:
            self._transport_ended()
            return None
        self._last_message = time.monotonic()
        if self._closing is not None:
            self._late += 1
            return None
        if self._state != "open":  # read by a task iterating after the block ended
            self._queue.discard_one(message)
            return None
        if self._queue.pass_through(message, self._size(message)):
            return message
        self._overflowed(False)  # too large
        return None

    async def batches(self, max_items: int, max_wait: float) -> AsyncIterator[list[Message]]:
        """Yield lists of messages: each waits for one, then up to ``max_wait`` s more.

        For many small messages: one wake-up and one loop iteration of your code per
        batch instead of per message.

        Args:
            max_items: Most messages in a batch (>= 1).
            max_wait: Seconds to wait for more once the first is in (>= 0).

        Yields:
            Non-empty lists, in arrival order, until the stream ends.

        Raises:
            ValueError: ``max_items`` < 1 or ``max_wait`` < 0 (at the first step).
            RuntimeError: Used outside its block.
        """
        self._usable()
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be an int >= 1, got {max_items!r}")
        if not (isinstance(max_wait, (int, float)) and max_wait >= 0):
            raise ValueError(f"max_wait must be a number >= 0, got {max_wait!r}")
        # Batches gather what the receiver task queued meanwhile: it reads from now on.
        self._direct_ok = False
        self._to_background()
        while True:
            batch = await self._queue.get_batch(max_items, max_wait)
            if not batch:
                break
            sampled = self._sampled
            taken = time.perf_counter()
            yield batch
            if sampled:
                m.record(m.WEBSOCKET_PROCESS_DURATION, time.perf_counter() - taken, self._attrs)
            self._usable()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _on_get(self, wait: float) -> None:
        self._sampled = _sampler.take()
        if self._sampled:
            m.record(m.WEBSOCKET_RECEIVE_TIME_IN_QUEUE, wait, self._attrs)

    # -- the block -------------------------------------------------------------------

    async def __aenter__(self) -> Inbox:
        if self._state != "new":
            raise RuntimeError("an inbox is entered once")
        self._state = "open"
        self._last_message = time.monotonic()
        self._loop = loop = asyncio.get_running_loop()
        _registry.add(self)
        self._receiver = asyncio.create_task(self._receive_loop(), name="loopguard-ws-receiver")
        if self._idle_timeout is not None or self._ping_interval is not None:
            self._keeper = asyncio.create_task(self._keep(), name="loopguard-ws-keeper")
        if self._mode == "direct":
            # Until the consumer first waits for a message, it counts as busy: code that
            # runs long before its `async for` has the receiver task read meanwhile.
            _handover(loop).leave(self, loop, idle=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._state = "ended"
        if self._loop is not None:
            _handover(self._loop).back(self)
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        if self._reading:
            self._abort_pending_read()  # a task still iterating after the block
        if self._closer is not None and not self._closer.done():
            # Let the close frame go out (the receiver reads the peer's answer meanwhile).
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({self._closer}, timeout=_CLOSE_GRACE)
        tasks = [t for t in (self._receiver, self._keeper, self._closer) if t is not None]
        for task in tasks:
            task.cancel()
        # Awaited even when this task is being cancelled: nothing may outlive the block.
        if tasks:
            await asyncio.wait(tasks)
        self._queue.close()
        self._queue.discard()
        self._finish()

    # -- the receiver task: receive and enqueue, nothing else --------------------------

    async def _receive_loop(self) -> None:
        transport, queue = self._transport, self._queue
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._mode == "direct" or self._ended or self._reading:
                    # The consumer reads itself (or the stream is over): sleep until
                    # reading is handed over.
                    self._park = park = loop.create_future()
                    try:
                        await park
                    finally:
                        self._park = None
                    continue
                message = await transport.receive()
                if message is None:
                    self._transport_ended()
                    continue
                admitted = self._admit(message)
                if admitted is None:  # "block" and full: wait for room, read nothing
                    try:
                        admitted = await queue.put(message, self._size(message))
                    except QueueClosed:  # the guard closed while this one waited for room
                        self._late += 1
                        continue
                    self._overflowed(admitted)
                if (
                    admitted
                    and self._waiting
                    and self._direct_ok
                    and self._closing is None
                    and len(queue) == 1
                ):
                    # The consumer waits for this one: it keeps up, let it read again.
                    self._mode = "direct"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the transport failed: end the stream, tell the consumer
            self._failed(exc)

    def _size(self, message: Message) -> int:
        return _nbytes(message) if self._sized else 0

    def _admit(self, message: Message) -> bool | None:
        """Account for one received message: queue it, drop it or count it late.

        Returns ``True`` if queued, ``False`` if dropped or late, ``None`` if it must
        wait for room (``"block"``).
        """
        self._last_message = time.monotonic()
        if self._closing is not None:
            self._late += 1
            return False
        queued = self._queue.offer(message, self._size(message))
        if queued is False:
            self._overflowed(queued)
        return queued

    def _overflowed(self, queued: bool) -> None:
        if not queued and self._queue.overflowed is not None:
            self._close(self._queue.overflowed)

    def _to_background(self) -> None:
        """Hand reading to the receiver task (waking it if it sleeps)."""
        self._mode = "background"
        park = self._park
        if park is not None and not park.done():
            park.set_result(None)

    def _hand_over(self) -> None:
        """The consumer is busy: the receiver task reads meanwhile."""
        if self._mode == "direct" and not self._reading and self._state == "open":
            self._to_background()

    def _failed(self, exc: Exception) -> None:
        self._error = exc
        self.close_reason = self.close_reason or "error"
        self._transport_ended()

    def _transport_ended(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._state == "open" or self._closing is not None:
            code = self._transport.closed_code()
            if self.close_code is None:
                self.close_code = code
        if self.close_reason is None and self._state == "open":
            keepalive = self.close_code == 1011 and self._transport.keepalive_closed()
            self.close_reason = "keepalive" if keepalive else "peer"
            if keepalive:
                self._explain("keepalive", 1011)
        self._queue.close()
        if self._keeper is not None and self._keeper is not asyncio.current_task():
            self._keeper.cancel()

    # -- closing for a reason ---------------------------------------------------------

    def _close(self, reason: str) -> None:
        """Close the connection for ``reason`` now; the stream ends after what is queued."""
        if self._closing is not None or self._state != "open":
            return
        code = CLOSE_CODES[reason]
        self._closing = self.close_reason = reason
        self.close_code = code
        self._explain(reason, code)
        self._queue.close()
        self._closer = asyncio.create_task(self._send_close(code, _CLOSE_TEXT[reason]))
        if self._reading and self._loop is not None:
            # The consumer waits in the transport: the closing handshake ends its read;
            # a peer that never answers is dropped after the grace.
            self._abort_timer = self._loop.call_later(_CLOSE_GRACE, self._abort_pending_read)

    def _abort_pending_read(self) -> None:
        abort = getattr(self._transport, "abort", None)
        if self._reading and abort is not None:
            try:
                abort()
            except Exception:
                logger.debug("aborting a guarded WebSocket failed", exc_info=True)

    async def _send_close(self, code: int, text: str) -> None:
        try:
            await self._transport.close(code, text)
        except Exception:  # already closed by the peer: nothing to do
            logger.debug("closing a guarded WebSocket failed", exc_info=True)

    def _explain(self, reason: str, code: int) -> None:
        """Emit a ConnectionClosed event with the queue's state and a stall to blame."""
        try:
            queue = self._queue
            window = (
                self._ping_interval + (self._ping_timeout or 0.0)
                if self._ping_interval is not None
                else _DEFAULT_WINDOW
            )
            stalls = loopguard.recent_stalls(window)
            worst = max(stalls, key=lambda s: s.duration) if stalls else None
            full_since = None
            if queue.full_since is not None:
                full_since = time.time() - (time.monotonic() - queue.full_since)
            loopguard.report(
                ConnectionClosed(
                    code=code,
                    reason=reason,
                    route=self.route,
                    depth=len(queue),
                    maxsize=queue.maxsize,
                    full_since=full_since,
                    delivered=queue.delivered,
                    dropped=self.dropped,
                    lag=self.lag,
                    ping_rtt=self.ping_rtt,
                    stall=worst.culprit if worst is not None else None,
                    stall_duration=worst.duration if worst is not None else None,
                )
            )
        except Exception:
            logger.exception("loopguard could not explain a WebSocket close")

    # -- the keeper task: pings and the idle timeout -------------------------------------

    async def _keep(self) -> None:
        interval, idle = self._ping_interval, self._idle_timeout
        next_ping = time.monotonic() + interval if interval is not None else None
        while self._closing is None:
            now = time.monotonic()
            wake = []
            if idle is not None:
                idle_at = self._last_message + idle
                if now >= idle_at:
                    self._close("idle")
                    return
                wake.append(idle_at)
            if next_ping is not None and interval is not None:
                if now >= next_ping:
                    if not await self._ping():
                        return
                    next_ping = time.monotonic() + interval
                    continue
                wake.append(next_ping)
            await asyncio.sleep(min(wake) - now)

    async def _ping(self) -> bool:
        """One ping; False when the connection is closing (by timeout or otherwise)."""
        started = time.monotonic()
        try:
            waiter = await self._transport.ping()
            if waiter is None:
                self._ping_interval = None
                return True
            await asyncio.wait_for(waiter, self._ping_timeout)
        except asyncio.TimeoutError:
            self._close("keepalive")
            return False
        except Exception:  # closed meanwhile; the receiver sees it too
            return False
        self.ping_rtt = time.monotonic() - started
        m.record(m.WEBSOCKET_PING_DURATION, self.ping_rtt, self._attrs)
        return True

    # -- the end -----------------------------------------------------------------------

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        _registry.remove(self)
        if self.close_code is not None:
            code = self.close_code
            # Codes a peer may choose (3000-4999) are folded: the attribute stays bounded.
            bounded = code if code < 3000 else code // 1000 * 1000
            m.record(
                m.WEBSOCKET_CLOSES,
                1,
                {
                    **self._attrs,
                    "websocket.close.code": bounded,
                    "websocket.close.reason": self.close_reason or "peer",
                },
            )


def guard(
    transport: Transport,
    *,
    maxsize: int,
    max_bytes: int | None = None,
    overflow: Overflow = "block",
    idle_timeout: float | None = None,
    ping_interval: float | None = None,
    ping_timeout: float | None = None,
) -> Inbox:
    """Return the inbox of ``transport``; ``async with`` starts and stops its tasks.

    The adapters' ``guard_receive`` call this; see them for the arguments.
    """
    return Inbox(
        transport,
        maxsize=maxsize,
        max_bytes=max_bytes,
        overflow=overflow,
        idle_timeout=idle_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )


def active_connections() -> int:
    """Guarded connections open now in this process."""
    return _registry.active
