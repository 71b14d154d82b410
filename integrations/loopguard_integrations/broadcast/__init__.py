"""Broadcast that no slow reader can stall: channels, bounded subscribers, WebSocket groups.

``Broadcast("memory://")`` or ``Broadcast("redis://HOST:PORT[/DB]")`` is a drop-in for
encode/broadcaster's ``Broadcast``: ``connect()``/``disconnect()`` (or ``async with``),
``publish(channel, message)``, ``async with subscribe(channel) as subscriber``. Each
subscriber has a bounded queue with an overflow policy; ``group(channel)`` fans a
channel out to WebSocket connections, evicting those that cannot keep up; Redis
carries messages between processes, reconnecting after outages and counting what they
lost.
"""

from ._broadcast import Broadcast as Broadcast
from ._group import Group as Group
from ._group import GroupOverflow as GroupOverflow
from ._group import Member as Member
from ._subscriber import Subscriber as Subscriber
from ._types import BackplaneUnavailable as BackplaneUnavailable
from ._types import BroadcastStats as BroadcastStats
from ._types import Delivery as Delivery
from ._types import Event as Event
from ._types import SubscriberOverflow as SubscriberOverflow
from ._types import Unsubscribed as Unsubscribed

__all__ = [
    "BackplaneUnavailable",
    "Broadcast",
    "BroadcastStats",
    "Delivery",
    "Event",
    "Group",
    "GroupOverflow",
    "Member",
    "Subscriber",
    "SubscriberOverflow",
    "Unsubscribed",
]
