"""A bounded queue that never loses an item silently, with a policy for when it is full.

This module owns the one queue both the guarded WebSocket receiver and broadcast build
on. It is framework-free and single-loop (like :class:`asyncio.Queue`, not thread-safe).

Every item offered to :meth:`BoundedQueue.put` ends in exactly one of three states:
handed out (``delivered``), dropped with a reason (``drops``), or still queued. Items
handed out keep the order they were put in. The queue is bounded by item count
(``maxsize``) and, optionally, by the sum of the sizes the producer declares
(``max_bytes``). What happens when an item does not fit is the *overflow policy*:

- ``"block"``: :meth:`~BoundedQueue.put` waits for room. A receiver that waits stops
  reading its socket, so the transport pushes back on the sender.
- ``"drop_oldest"``: the oldest queued items make room for the new one.
- ``"drop_newest"``: the new item is dropped.
- ``"close"``: the new item is dropped and :attr:`~BoundedQueue.overflowed` is set; the
  caller ends the stream (a WebSocket closes with 1013, or 1009 for an item too large).

An item larger than ``max_bytes`` can never fit: it is dropped as ``"too_large"`` under
every policy (and sets ``overflowed`` under ``"close"``).

:meth:`~BoundedQueue.close` ends the stream without waiting: producers waiting for room
are woken with :class:`QueueClosed`, consumers drain what is queued and then get
:class:`QueueClosed` (``async for`` simply stops).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from typing import Generic, Literal, TypeVar, get_args

__all__ = [
    "OVERFLOW_POLICIES",
    "BoundedQueue",
    "Overflow",
    "QueueClosed",
    "check_bounds",
]

T = TypeVar("T")

Overflow = Literal["block", "drop_oldest", "drop_newest", "close"]
#: The overflow policies, in the order the docs present them.
OVERFLOW_POLICIES: tuple[str, ...] = get_args(Overflow)

#: Reasons an item is dropped, as counted in :attr:`BoundedQueue.drops`.
DROP_REASONS = ("overflow", "too_large", "discarded")


class QueueClosed(Exception):
    """The queue was closed: nothing more can be put, and nothing is left to get."""


def check_bounds(maxsize: int, max_bytes: int | None, overflow: str) -> None:
    """Refuse bounds and policies the queue cannot honour, naming the argument.

    Args:
        maxsize: Most items queued at once; an int of at least 1.
        max_bytes: Most bytes queued at once (sum of declared sizes), or ``None``.
        overflow: One of :data:`OVERFLOW_POLICIES`.

    Raises:
        ValueError: An argument is out of range or unknown.
    """
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
        raise ValueError(f"maxsize must be an int >= 1, got {maxsize!r}")
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1
    ):
        raise ValueError(f"max_bytes must be None or an int >= 1, got {max_bytes!r}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")


class BoundedQueue(Generic[T]):
    """A bounded FIFO with an overflow policy and an account of every item.

    Attributes:
        maxsize: Most items queued at once.
        max_bytes: Most bytes queued at once, or ``None`` for no byte bound.
        overflow: What :meth:`put` does when an item does not fit.
        delivered: Items handed out so far.
        dropped: Items dropped so far, all reasons.
        drops: Items dropped so far by reason: ``"overflow"`` (the policy dropped one
            because the queue was full), ``"too_large"`` (one item over ``max_bytes``),
            ``"discarded"`` (still queued when :meth:`discard` was called).
        nbytes: Sum of the sizes of the items queued now.
        full_since: ``time.monotonic()`` when the queue last became full; ``None``
            while it is not full.
        overflowed: Under ``overflow="close"``: ``None`` until an item did not fit,
            then ``"overflow"`` or ``"too_large"``.
        closed: Whether :meth:`close` was called.
        last_wait: Seconds the last item handed out spent in the queue.
    """

    def __init__(
        self,
        *,
        maxsize: int,
        max_bytes: int | None = None,
        overflow: Overflow = "block",
        on_drop: Callable[[T, str], None] | None = None,
        on_get: Callable[[float], None] | None = None,
    ) -> None:
        """Create an empty queue.

        Args:
            maxsize: Most items queued at once (>= 1).
            max_bytes: Most bytes queued at once (>= 1), or ``None``.
            overflow: ``"block"``, ``"drop_oldest"``, ``"drop_newest"`` or ``"close"``.
            on_drop: Called with each dropped item and its reason. Exceptions it raises
                are not caught: keep it trivial.
            on_get: Called with the seconds each item spent in the queue, as it is
                handed out (for a time-in-queue histogram).

        Raises:
            ValueError: A bound or the policy is invalid (the message names which).
        """
        check_bounds(maxsize, max_bytes, overflow)
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.overflow: Overflow = overflow
        self.delivered = 0
        self.dropped = 0
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.nbytes = 0
        self.full_since: float | None = None
        self.overflowed: str | None = None
        self.closed = False
        self.last_wait = 0.0
        self._on_drop = on_drop
        self._on_get = on_get
        self._items: collections.deque[tuple[T, int, float]] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def oldest_since(self) -> float | None:
        """``time.monotonic()`` when the oldest queued item was put; ``None`` if empty.

        Safe to read from another thread (a metrics collector): a race with a consumer
        reads as empty.
        """
        try:
            return self._items[0][2]
        except IndexError:
            return None

    # -- producer side -------------------------------------------------------------

    def _fits(self, nbytes: int) -> bool:
        if len(self._items) >= self.maxsize:
            return False
        return self.max_bytes is None or self.nbytes + nbytes <= self.max_bytes

    def _drop(self, item: T, reason: str) -> None:
        self.dropped += 1
        self.drops[reason] += 1
        if self._on_drop is not None:
            self._on_drop(item, reason)

    def _append(self, item: T, nbytes: int) -> None:
        self._items.append((item, nbytes, time.monotonic()))
        self.nbytes += nbytes
        self._readable.set()
        if not self._fits(0):
            self._writable.clear()
            if self.full_since is None:
                self.full_since = time.monotonic()

    def _too_large(self, item: T, nbytes: int) -> bool:
        """Drop (and count) an item that can never fit ``max_bytes``."""
        if self.max_bytes is None or nbytes <= self.max_bytes:
            return False
        self._drop(item, "too_large")
        if self.overflow == "close":
            self.overflowed = self.overflowed or "too_large"
        return True

    def _offer(self, item: T, nbytes: int) -> bool | None:
        """Queue or drop ``item`` by policy; ``None`` means "block: wait for room"."""
        if self.closed:
            raise QueueClosed("put() on a closed queue")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        if self._too_large(item, nbytes):
            return False
        if self._fits(nbytes):
            self._append(item, nbytes)
            return True
        if self.overflow == "block":
            return None
        if self.overflow == "drop_oldest":
            while self._items and not self._fits(nbytes):
                old, old_bytes, _ = self._items.popleft()
                self.nbytes -= old_bytes
                self._drop(old, "overflow")
            self._append(item, nbytes)
            return True
        self._drop(item, "overflow")
        if self.overflow == "close":
            self.overflowed = self.overflowed or "overflow"
        return False

    async def put(self, item: T, nbytes: int = 0) -> bool:
        """Offer one item; under ``"block"`` wait until it fits.

        Args:
            item: The item.
            nbytes: Its size, counted against ``max_bytes``.

        Returns:
            ``True`` if the item was queued; ``False`` if it was dropped (and counted),
            in which case under ``"close"`` :attr:`overflowed` says why.

        Raises:
            QueueClosed: The queue is closed, or was closed while waiting for room.
            ValueError: ``nbytes`` is negative.
        """
        while True:
            queued = self._offer(item, nbytes)
            if queued is not None:
                return queued
            self._writable.clear()
            await self._writable.wait()

    def offer(self, item: T, nbytes: int = 0) -> bool | None:
        """Queue or drop one item by policy, without waiting.

        Returns:
            ``True`` if queued, ``False`` if dropped (and counted), ``None`` under
            ``"block"`` when it does not fit now (nothing counted: :meth:`put` it).

        Raises:
            QueueClosed: The queue is closed.
            ValueError: ``nbytes`` is negative.
        """
        return self._offer(item, nbytes)

    def pass_through(self, item: T, nbytes: int = 0) -> bool:
        """Account for an item handed straight to a consumer that found the queue empty.

        The item never waits: it is counted as delivered (0 s in the queue) if it
        could have been queued, else dropped as :meth:`offer` would drop it.

        Returns:
            ``True`` if the caller may hand it out, ``False`` if it was dropped.

        Raises:
            QueueClosed: The queue is closed.
        """
        if self.closed:
            raise QueueClosed("pass_through() on a closed queue")
        if self._too_large(item, nbytes):
            return False
        if self._items:
            raise RuntimeError("pass_through() would overtake queued items")
        self.delivered += 1
        self.last_wait = 0.0
        if self._on_get is not None:
            self._on_get(0.0)
        return True

    def put_nowait(self, item: T, nbytes: int = 0) -> bool:
        """Offer one item without waiting.

        Returns:
            As :meth:`put`.

        Raises:
            asyncio.QueueFull: Under ``"block"``, the item does not fit now (nothing
                is counted: offer it again later).
            QueueClosed: The queue is closed.
            ValueError: ``nbytes`` is negative.
        """
        queued = self._offer(item, nbytes)
        if queued is None:
            raise asyncio.QueueFull
        return queued

    # -- consumer side -------------------------------------------------------------

    def get_nowait(self) -> T:
        """Hand out the oldest item.

        Raises:
            asyncio.QueueEmpty: Nothing queued yet, and the queue is open.
            QueueClosed: The queue is closed and drained.
        """
        if not self._items:
            if self.closed:
                raise QueueClosed("the queue is closed and drained")
            raise asyncio.QueueEmpty
        item, nbytes, stamped = self._items.popleft()
        self.nbytes -= nbytes
        self.delivered += 1
        self.last_wait = time.monotonic() - stamped
        if not self._items and not self.closed:
            self._readable.clear()
        if self._fits(0):
            self.full_since = None
            self._writable.set()
        if self._on_get is not None:
            self._on_get(self.last_wait)
        return item

    async def get(self) -> T:
        """Wait for the oldest item and hand it out.

        Raises:
            QueueClosed: The queue is closed and drained (the end of the stream).
        """
        while True:
            try:
                return self.get_nowait()
            except asyncio.QueueEmpty:
                await self._readable.wait()

    async def get_batch(self, max_items: int, max_wait: float) -> list[T]:
        """Wait for one item, then gather more for up to ``max_wait`` seconds.

        Args:
            max_items: Most items returned (>= 1).
            max_wait: Seconds to wait for more once the first item is in (>= 0).

        Returns:
            Between 1 and ``max_items`` items in order; ``[]`` only at the end of the
            stream.

        Raises:
            ValueError: ``max_items`` < 1 or ``max_wait`` < 0.
        """
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be an int >= 1, got {max_items!r}")
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait!r}")
        try:
            batch = [await self.get()]
        except QueueClosed:
            return []
        deadline = time.monotonic() + max_wait
        while len(batch) < max_items:
            try:
                batch.append(self.get_nowait())
                continue
            except QueueClosed:
                break
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._readable.wait(), left)
            except asyncio.TimeoutError:
                break
        return batch

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        while True:
            try:
                item = await self.get()
            except QueueClosed:
                return
            yield item

    # -- ending --------------------------------------------------------------------

    def close(self) -> None:
        """End the stream: refuse further items, let consumers drain what is queued.

        Never waits. Producers waiting for room get :class:`QueueClosed`; consumers
        get the queued items, then :class:`QueueClosed`. Idempotent.
        """
        self.closed = True
        self._readable.set()
        self._writable.set()

    def discard_one(self, item: T) -> None:
        """Count an item that arrived for a consumer that is gone as ``"discarded"``."""
        self._drop(item, "discarded")

    def discard(self) -> int:
        """Drop everything still queued, counted as ``"discarded"``.

        Returns:
            How many items were dropped.
        """
        count = 0
        while self._items:
            item, nbytes, _ = self._items.popleft()
            self.nbytes -= nbytes
            self._drop(item, "discarded")
            count += 1
        self.full_since = None
        if not self.closed:
            self._readable.clear()
        self._writable.set()
        return count
