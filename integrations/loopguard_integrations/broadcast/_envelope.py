r"""What goes over Redis: the envelope around a message, and counting what never came.

Each message is sent as one Redis pub/sub payload::

    b"\\x00lg1|" ORIGIN b"|" SEQ b"|" SENT_AT b"|" KIND b"|" PAYLOAD

``ORIGIN`` identifies the publishing :class:`Broadcast` (random, per instance), ``SEQ``
numbers that publisher's messages per channel from 1, ``SENT_AT`` is the publisher's
wall clock (seconds since the epoch) for the publish-to-deliver lag, ``KIND`` is ``s``
(text, UTF-8) or ``b`` (bytes). A payload without the prefix was published by
something else (``redis-cli PUBLISH``, another library) and is delivered as it is.

Receivers keep the last sequence number per (origin, channel) and count a jump as lost
messages; that is how the at-most-once losses of Redis pub/sub (an outage, a dropped
connection) become a number instead of silence. Both tables are bounded.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["GapCounter", "Numbering", "Unpacked", "new_origin", "pack", "unpack"]

PREFIX = b"\x00lg1|"
_TABLE_LIMIT = 65_536
_PUBLISHERS_PER_CHANNEL = 1_024


def new_origin() -> bytes:
    """A random publisher id (16 hex characters)."""
    return os.urandom(8).hex().encode()


def pack(origin: bytes, seq: int, sent_at: float, message: str | bytes) -> bytes:
    """Wrap a message in the envelope."""
    if isinstance(message, str):
        kind, payload = b"s", message.encode()
    else:
        kind, payload = b"b", message
    return b"%s%s|%d|%.6f|%s|%s" % (PREFIX, origin, seq, sent_at, kind, payload)


@dataclass(frozen=True, slots=True)
class Unpacked:
    """A received payload: the message and, if loopguard sent it, its envelope fields."""

    message: str | bytes
    origin: bytes | None = None
    seq: int = 0
    sent_at: float = 0.0


def unpack(data: bytes) -> Unpacked:
    """Read a payload; anything not in the envelope is delivered as is (text if UTF-8)."""
    if data.startswith(PREFIX):
        try:
            origin, seq, sent_at, kind, payload = data[len(PREFIX) :].split(b"|", 4)
            message: str | bytes = payload.decode() if kind == b"s" else payload
            return Unpacked(message, origin, int(seq), float(sent_at))
        except ValueError:
            pass  # not ours after all: deliver it as it came
    try:
        return Unpacked(data.decode())
    except UnicodeDecodeError:
        return Unpacked(data)


def _remember(table: OrderedDict[bytes, int], key: bytes, value: int) -> None:
    table[key] = value
    table.move_to_end(key)
    if len(table) > _TABLE_LIMIT:
        table.popitem(last=False)


class Numbering:
    """A publisher's next sequence number per channel.

    Bounded: the channels unused for longest start again at 1, which receivers take as
    a restart, not a loss.
    """

    def __init__(self) -> None:
        self._last: OrderedDict[bytes, int] = OrderedDict()

    def next(self, channel: str) -> int:
        """The number for the next message on ``channel``."""
        key = channel.encode()
        seq = self._last.get(key, 0) + 1
        _remember(self._last, key, seq)
        return seq


class GapCounter:
    """Counts messages missing between consecutive sequence numbers of each publisher.

    Kept per channel listened to (forgotten when the channel is no longer listened to),
    with at most 1,024 publishers per channel (the least recently heard is forgotten).
    """

    def __init__(self) -> None:
        self._last: dict[str, OrderedDict[bytes, int]] = {}

    def missing(self, origin: bytes, channel: str, seq: int) -> int:
        """How many messages of this publisher on this channel were skipped before ``seq``.

        The first message seen from a publisher sets the baseline; a number that does
        not go up (a restarted numbering) resets it.
        """
        table = self._last.get(channel)
        if table is None:
            table = self._last[channel] = OrderedDict()
        last = table.get(origin)
        table[origin] = seq
        table.move_to_end(origin)
        if len(table) > _PUBLISHERS_PER_CHANNEL:
            table.popitem(last=False)
        if last is None or seq <= last:
            return 0
        return seq - last - 1

    def forget(self, channel: str) -> None:
        """Drop the baselines of a channel no longer listened to.

        A later message on it starts a new baseline instead of counting the messages
        not listened to as lost.
        """
        self._last.pop(channel, None)
