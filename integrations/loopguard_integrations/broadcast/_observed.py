"""Broadcast's metrics: counts recorded per fan-out, and gauges read at collection.

Counts are recorded once per publish (not once per connection), so a fan-out to
5,000 connections costs a few metric calls. Gauges (subscribers, members, queued
messages) are read from the live broadcasts and groups when the OpenTelemetry SDK
collects, from its own thread: the tables are copied with a retry, because the loop
may change them meanwhile.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from loopguard import metrics

if TYPE_CHECKING:
    from ._types import Delivery

__all__ = ["count_connection_delivery", "count_subscriber_delivery", "track"]

_live: weakref.WeakSet[Any] = weakref.WeakSet()
_registered = False


def track(owner: object) -> None:
    """Include a Broadcast or Group in the gauges while it lives."""
    global _registered
    _live.add(owner)
    if not _registered:
        _registered = True
        metrics.observe(metrics.BROADCAST_SUBSCRIBER_COUNT, _subscribers)
        metrics.observe(metrics.BROADCAST_MEMBER_COUNT, _members)
        metrics.observe(metrics.BROADCAST_QUEUE_SIZE, _queued)


def _copy(items: Iterable[Any]) -> list[Any]:
    for _ in range(5):
        try:
            return list(items)
        except RuntimeError:  # changed size during iteration (the loop thread)
            continue
    return []


def _owners(kind: str) -> list[Any]:
    return [o for o in _copy(_live) if type(o).__name__ == kind]


def _subscribers() -> list[tuple[float, metrics.Attributes | None]]:
    total = 0
    for broadcast in _owners("Broadcast"):
        total += sum(len(s) for s in _copy(broadcast._subscribers.values()))
    return [(total, None)]


def _members() -> list[tuple[float, metrics.Attributes | None]]:
    return [(sum(len(g._members) for g in _owners("Group")), None)]


def _queued() -> list[tuple[float, metrics.Attributes | None]]:
    subscribers = 0
    for broadcast in _owners("Broadcast"):
        for subs in _copy(broadcast._subscribers.values()):
            subscribers += sum(s.pending for s in _copy(subs))
    connections = sum(len(m._queue) for g in _owners("Group") for m in _copy(g._members))
    return [
        (subscribers, {"broadcast.queue.target": "subscriber"}),
        (connections, {"broadcast.queue.target": "connection"}),
    ]


def _count(target: str, report: Delivery, too_large: int) -> None:
    if report.delivered:
        metrics.record(
            metrics.BROADCAST_MESSAGES,
            report.delivered,
            {"broadcast.message.target": target, "broadcast.message.outcome": "delivered"},
        )
    too_large = min(too_large, report.dropped)
    for reason, count in (("too_large", too_large), ("overflow", report.dropped - too_large)):
        if count:
            metrics.record(
                metrics.BROADCAST_MESSAGES,
                count,
                {
                    "broadcast.message.target": target,
                    "broadcast.message.outcome": "dropped",
                    "broadcast.message.drop_reason": reason,
                },
            )


def count_subscriber_delivery(report: Delivery, *, too_large: int) -> None:
    """Record what one publish did to the local subscribers.

    ``too_large`` of its drops were of a message over a subscriber's ``max_bytes``.
    """
    _count("subscriber", report, too_large)


def count_connection_delivery(report: Delivery, *, too_large: bool) -> None:
    """Record what one fan-out did to a group's connections."""
    _count("connection", report, report.dropped if too_large else 0)
