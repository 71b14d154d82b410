"""When a consumer holds a message too long, hand reading over to the receiver task.

This module owns :data:`GRACE`, :data:`IDLE` and the per-loop :class:`Handover` clock. A guarded
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

One timer per loop serves every connection: it is armed only while some consumer is
away, and fires at most once per :data:`GRACE`, however many connections there are. A
message arriving while a consumer is away waits at most about :data:`GRACE` in the
server's own buffer (which keeps reading the socket and answering pings meanwhile)
before the guard reads it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
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
    """The busy consumers of one loop, and the one timer that checks them."""

    def __init__(self) -> None:
        self._away: dict[_Away, float] = {}
        self._armed = False  # a check is scheduled (the loop's timer holds this object)

    def leave(self, inbox: _Away, loop: asyncio.AbstractEventLoop, *, idle: bool) -> None:
        """``inbox``'s consumer is about to process a message.

        Args:
            inbox: The inbox.
            loop: The running loop (the one this object belongs to).
            idle: Whether the consumer waited for this message (a new busy period
                starts now); if not, a busy period under way goes on.
        """
        now = loop.time()
        if idle or inbox not in self._away:
            self._away[inbox] = now
        if not self._armed:
            self._armed = True
            loop.call_at(now + GRACE, self._check, loop)

    def back(self, inbox: _Away) -> None:
        """The consumer of ``inbox`` is gone."""
        self._away.pop(inbox, None)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._armed = False
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
            self._armed = True
            loop.call_at(oldest + GRACE, self._check, loop)


# One per loop, forgotten with the loop (nothing here refers to the loop itself).
_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Handover] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def handover(loop: asyncio.AbstractEventLoop) -> Handover:
    """The :class:`Handover` of ``loop``."""
    found = _per_loop.get(loop)
    if found is None:
        with _lock:  # loops in several threads may ask at once
            found = _per_loop.setdefault(loop, Handover())
    return found
