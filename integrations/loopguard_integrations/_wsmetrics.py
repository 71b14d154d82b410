"""The observed WebSocket metrics: a registry of live inboxes, read at collection time.

This module owns :class:`Registry`: the guarded connections open now and the totals of
those that closed, by route. The metrics that describe state (queue size and capacity,
lag, messages delivered and dropped, active connections) are computed from it when the
OpenTelemetry SDK collects, so they cost nothing per message.

It also owns :class:`Sampler`, which decides which messages' time in queue and process
duration go into their histograms. An SDK histogram record costs 10-25 µs, twice per
message, which would be a large share of a fast echo's cost; so while the process's
guards receive more than :data:`HISTOGRAM_BUDGET` messages a second, a random share of
about that many a second is recorded (every message below it). A random sample keeps
the distribution, hence the percentiles; the exact message counts are in
``websocket.receive.message.count``.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import loopguard.metrics as m

if TYPE_CHECKING:
    from ._receiver import Inbox

__all__ = ["HISTOGRAM_BUDGET", "Registry", "Sampler", "registry", "sampler"]

#: Messages a second (over every guard of the process) whose time in queue and process
#: duration are recorded; above it, a random share of about this many.
HISTOGRAM_BUDGET = 500


class Sampler:
    """Picks the messages whose histograms are recorded: about ``budget`` a second.

    The share kept in each one-second window is ``budget`` over the previous window's
    rate; within a window, no more than twice the budget are kept, so a sudden burst
    costs at most that. Called from loop threads; the counters are advisory, so a race
    between two loops only moves the share slightly.
    """

    def __init__(
        self,
        budget: int = HISTOGRAM_BUDGET,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.budget = budget
        self._clock = clock
        self._random = rand
        self.reset()

    def reset(self) -> None:
        """Start afresh: every message kept until the next window says otherwise."""
        self._window = self._clock()
        self._seen = 0
        self._kept = 0
        self._share = 1.0

    def take(self) -> bool:
        """Whether to record this message's histograms."""
        self._seen += 1
        now = self._clock()
        if now - self._window >= 1.0:
            rate = self._seen / (now - self._window)
            self._share = min(1.0, self.budget / rate)
            self._window, self._seen, self._kept = now, 0, 0
        if self._kept >= 2 * self.budget:
            return False
        if self._share >= 1.0 or self._random() < self._share:
            self._kept += 1
            return True
        return False


class Registry:
    """Live inboxes and the counts of finished ones, for the observed metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, Inbox] = {}
        self._done: Counter[tuple[str, str, str]] = Counter()  # (route, outcome, reason)
        self._observing = False

    def add(self, inbox: Inbox) -> None:
        with self._lock:
            self._live[id(inbox)] = inbox
            first, self._observing = not self._observing, True
        if first:  # outside the lock: the SDK's thread takes it in the callbacks
            m.observe(m.WEBSOCKET_CONNECTION_ACTIVE, self._active)
            m.observe(m.WEBSOCKET_RECEIVE_QUEUE_SIZE, self._size)
            m.observe(m.WEBSOCKET_RECEIVE_QUEUE_CAPACITY, self._capacity)
            m.observe(m.WEBSOCKET_RECEIVE_LAG, self._lag)
            m.observe(m.WEBSOCKET_RECEIVE_MESSAGES, self._messages)

    def remove(self, inbox: Inbox) -> None:
        with self._lock:
            if self._live.pop(id(inbox), None) is None:
                return
            route = inbox.route or ""
            self._done[(route, "delivered", "")] += inbox.delivered
            for reason, count in inbox.drops.items():
                if count:
                    self._done[(route, "dropped", reason)] += count

    @property
    def active(self) -> int:
        """Guarded connections open now (tests and the demo read it)."""
        return len(self._live)

    def _inboxes(self) -> list[Inbox]:
        with self._lock:
            return list(self._live.values())

    def _by_route(self, value: str) -> Iterable[tuple[float, m.Attributes | None]]:
        sums: dict[str, float] = {}
        for inbox in self._inboxes():
            route = inbox.route or ""
            if value == "count":
                sums[route] = sums.get(route, 0) + 1
            elif value == "size":
                sums[route] = sums.get(route, 0) + len(inbox)
            elif value == "capacity":
                sums[route] = sums.get(route, 0) + inbox.maxsize
            else:
                sums[route] = max(sums.get(route, 0.0), inbox.lag)
        return [(v, {"http.route": r} if r else None) for r, v in sums.items()]

    def _active(self) -> Iterable[tuple[float, m.Attributes | None]]:
        # Routes seen once keep reporting 0, so the series goes back to 0, not stale.
        seen = {route for route, _, _ in self._done}
        now = dict(((a or {}).get("http.route", ""), v) for v, a in self._by_route("count"))
        return [(now.get(r, 0), {"http.route": r} if r else None) for r in seen | set(now)]

    def _size(self) -> Iterable[tuple[float, m.Attributes | None]]:
        return self._by_route("size")

    def _capacity(self) -> Iterable[tuple[float, m.Attributes | None]]:
        return self._by_route("capacity")

    def _lag(self) -> Iterable[tuple[float, m.Attributes | None]]:
        return self._by_route("lag")

    def _messages(self) -> Iterable[tuple[float, m.Attributes | None]]:
        with self._lock:
            totals = Counter(self._done)
            live = list(self._live.values())
            for inbox in live:
                route = inbox.route or ""
                totals[(route, "delivered", "")] += inbox.delivered
                for reason, count in inbox.drops.items():
                    if count:
                        totals[(route, "dropped", reason)] += count
        out: list[tuple[float, m.Attributes | None]] = []
        for (route, outcome, reason), value in totals.items():
            attrs: dict[str, str] = {"websocket.receive.message.outcome": outcome}
            if route:
                attrs["http.route"] = route
            if reason:
                attrs["error.type"] = reason
            out.append((value, attrs))
        return out


registry = Registry()
"""The process's registry (one per process, like the metrics it reports)."""

sampler = Sampler()
"""The process's histogram sampler (one per process, like the budget it keeps)."""
