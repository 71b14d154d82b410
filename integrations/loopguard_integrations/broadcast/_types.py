"""The values broadcast hands to users: events, delivery reports, statistics, errors."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "BackplaneUnavailable",
    "BroadcastStats",
    "Delivery",
    "Event",
    "SubscriberOverflow",
    "Unsubscribed",
]

Message = str | bytes
"""What can be published: text or bytes; subscribers get back the same type."""


@dataclass(frozen=True, slots=True)
class Event:
    """One published message, as a subscriber receives it.

    Attributes:
        channel: The channel it was published on.
        message: The message, ``str`` or ``bytes`` as it was published.
    """

    channel: str
    message: Message


@dataclass(slots=True)
class Delivery:
    """What one ``publish`` did in this process, counted when it returns.

    ``publish`` never waits for a reader (except subscribers created with
    ``overflow="block"``), so these counts describe hand-over, not reading:
    ``delivered`` messages were queued for a subscriber or a connection (or written to
    the connection's socket buffer at once); what a connection fails to write later is
    counted on its :class:`~loopguard_integrations.broadcast.Group`.

    Attributes:
        delivered: Subscribers and connections that got the message.
        dropped: Messages dropped because a queue was full (the oldest queued one under
            ``"drop_oldest"``, this one under ``"drop_newest"``) or too large.
        evicted: Subscribers or connections closed because their queue was full
            (``overflow="close"``).
    """

    delivered: int = 0
    dropped: int = 0
    evicted: int = 0

    def add(self, other: Delivery) -> None:
        """Add another report's counts to this one."""
        self.delivered += other.delivered
        self.dropped += other.dropped
        self.evicted += other.evicted


@dataclass
class BroadcastStats:
    """Running totals of one :class:`~loopguard_integrations.broadcast.Broadcast`.

    Attributes:
        published: Messages this process published.
        received: Messages that arrived from the backplane from other processes.
        echoes: This process's own messages that came back from Redis and were skipped
            (they were already delivered locally).
        lost: Messages another process numbered and published on a channel this process
            listens to that never arrived here (gaps in the publisher's sequence
            numbers: a Redis outage, a publish that failed, a connection that dropped).
        reconnects: Times the backplane connection was re-established after a loss.
        errors: Backplane errors (lost connections, failed publishes), by kind.
        foreign: Messages published by something other than loopguard (plain
            ``PUBLISH``), delivered as they are, with no loss accounting.
    """

    published: int = 0
    received: int = 0
    echoes: int = 0
    lost: int = 0
    reconnects: int = 0
    foreign: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        """Count one backplane error of this kind."""
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Unsubscribed(Exception):
    """``Subscriber.get()`` after the subscription ended.

    The ``async with`` exited or the broadcast disconnected; ``async for`` simply stops
    instead.
    """


class SubscriberOverflow(Exception):
    """A subscriber created with ``overflow="close"`` fell behind: its queue filled up.

    Raised from its iteration once the messages queued before the overflow are read;
    the subscription is over.
    """


class BackplaneUnavailable(ConnectionError):
    """The backplane (Redis) cannot be reached.

    Raised by ``connect()`` after the bounded retries, and by ``publish()`` during an
    outage (the message reached no one, so retrying is safe).
    """
