"""When a consumer holds a message too long, hand reading over to the receiver task.

This module owns :data:`GRACE` and the per-thread :class:`Handover` clock. A guarded
connection whose consumer keeps up reads *directly*: the consumer's own task awaits the
transport when its queue is empty, as an unguarded loop would, so a message costs no
second task wake-up and no extra loop iteration. The moment the consumer goes off to
process a message, it is marked *away*, and it stays away until it comes back and
actually waits for the next message: a read that returns at once (the message was
already waiting in the server's buffer) does not end the busy period, so a consumer
that falls behind a fast sender one short message at a time is seen as busy as one
stuck on a single message. A consumer away for more than :data:`GRACE` seconds has
its inbox hand reading over to its receiver task, which then reads and queues while
the consumer works (the receiver hands reading back when it finds the consumer
waiting on an empty queue).

One timer per thread serves every connection: it is armed only while some consumer is
away, and fires at most once per :data:`GRACE`, however many connections there are. A
message arriving while a consumer is away waits at most about :data:`GRACE` in the
server's own buffer (which keeps reading the socket and answering pings meanwhile)
before the guard reads it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Protocol

__all__ = ["GRACE", "IDLE", "Handover", "handover"]

logger = logging.getLogger("loopguard")

#: Seconds a consumer may be busy before its receiver task takes over reading.
GRACE = 0.005
#: A read that waited at least this long (seconds) found the consumer idle: it ends a
#: busy period. Shorter reads (the message was already buffered) continue it.
IDLE = 0.001


class _Away(Protocol):
    def _hand_over(self) -> None: ...


class Handover:
    """The consumers away on this thread's loop, and the one timer that checks them."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._away: dict[_Away, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def leave(self, inbox: _Away, loop: asyncio.AbstractEventLoop, *, idle: bool) -> None:
        """``inbox``'s consumer is about to process a message.

        Args:
            inbox: The inbox.
            loop: The running loop.
            idle: Whether the consumer waited for this message (a new busy period
                starts now); if not, a busy period under way goes on.
        """
        if loop is not self._loop:  # a new loop on this thread: forget the old one's
            self._loop, self._away, self._timer = loop, {}, None
        now = loop.time()
        if idle or inbox not in self._away:
            self._away[inbox] = now
        if self._timer is None:
            self._timer = loop.call_at(now + GRACE, self._check)

    def back(self, inbox: _Away) -> None:
        """The consumer of ``inbox`` is gone."""
        self._away.pop(inbox, None)

    def _check(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        due = loop.time() - GRACE
        oldest: float | None = None
        for inbox, since in list(self._away.items()):
            if since <= due:
                del self._away[inbox]
                try:
                    inbox._hand_over()
                except Exception:  # never into the user's loop
                    logger.exception("loopguard could not hand reading over")
            elif oldest is None or since < oldest:
                oldest = since
        if oldest is not None:
            self._timer = loop.call_at(oldest + GRACE, self._check)


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.handover = Handover()


_local = _PerThread()


def handover() -> Handover:
    """This thread's :class:`Handover` (one running loop per thread)."""
    return _local.handover
