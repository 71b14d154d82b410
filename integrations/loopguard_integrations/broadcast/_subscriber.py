"""One subscription: a bounded queue between ``publish`` and the subscriber's loop."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .._queue import BoundedQueue, Overflow, QueueClosed
from ._types import Event, SubscriberOverflow, Unsubscribed

__all__ = ["Subscriber"]


class Subscriber:
    """What ``async with broadcast.subscribe(channel) as subscriber`` gives.

    Iterate it (``async for event in subscriber``) or call :meth:`get`. Messages wait
    in a bounded queue; when it is full the subscription's ``overflow`` policy decides
    (see :meth:`Broadcast.subscribe`), and every message dropped is counted in
    :attr:`dropped` and :attr:`drops`.

    Attributes:
        channel: The channel subscribed to.
    """

    def __init__(
        self, channel: str, *, maxsize: int, max_bytes: int | None, overflow: Overflow
    ) -> None:
        self.channel = channel
        self._queue: BoundedQueue[Event] = BoundedQueue(
            maxsize=maxsize, max_bytes=max_bytes, overflow=overflow
        )

    def __repr__(self) -> str:
        q = self._queue
        return (
            f"<Subscriber channel={self.channel!r} queued={len(q)}/{q.maxsize} "
            f"overflow={q.overflow!r} dropped={q.dropped}>"
        )

    @property
    def maxsize(self) -> int:
        """Most messages queued at once."""
        return self._queue.maxsize

    @property
    def overflow(self) -> Overflow:
        """The overflow policy."""
        return self._queue.overflow

    @property
    def dropped(self) -> int:
        """Messages dropped so far, every reason."""
        return self._queue.dropped

    @property
    def drops(self) -> dict[str, int]:
        """Messages dropped so far, by reason.

        ``"overflow"``, ``"too_large"``, ``"discarded"`` (still queued when the
        subscription ended).
        """
        return dict(self._queue.drops)

    @property
    def delivered(self) -> int:
        """Messages handed to the subscriber so far."""
        return self._queue.delivered

    @property
    def pending(self) -> int:
        """Messages queued now, not read yet."""
        return len(self._queue)

    @property
    def overflowed(self) -> bool:
        """Whether an ``overflow="close"`` subscription was closed for falling behind."""
        return self._queue.overflowed is not None

    async def get(self) -> Event:
        """Wait for the next event.

        Raises:
            Unsubscribed: The subscription ended and every queued event was read.
            SubscriberOverflow: An ``overflow="close"`` subscription fell behind (raised
                after the events queued before the overflow are read).
        """
        try:
            return await self._queue.get()
        except QueueClosed:
            self._raise_end()
            raise  # pragma: no cover - _raise_end always raises

    def _raise_end(self) -> None:
        q = self._queue
        if q.overflowed is not None:
            why = "a message larger than max_bytes" if q.overflowed == "too_large" else "full"
            raise SubscriberOverflow(
                f"subscriber on channel {self.channel!r} was closed: its queue was {why} "
                f"(maxsize={q.maxsize}, max_bytes={q.max_bytes}, overflow='close')"
            ) from None
        raise Unsubscribed(f"the subscription to {self.channel!r} has ended") from None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            try:
                event = await self.get()
            except Unsubscribed:
                return
            yield event

    # -- used by Broadcast -----------------------------------------------------------

    def _end(self, *, discard: bool = False) -> None:
        if discard:
            self._queue.discard()
        self._queue.close()
