"""The bookkeeping of offloaded calls, and the metrics it feeds.

It owns :class:`Track`, one call as both the waiting task and the worker see it (its
limiter slot, its timing, and who is first at its start and at its end), and
:data:`active`, the count of calls in progress that ``loopguard.offload.active``
reports.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import anyio

from .. import metrics
from .waiting import shielded_wait, threadsafe_scheduler

__all__ = ["ActiveCalls", "Track", "active"]


class Track:
    """One offloaded call, as both the waiting task and the worker see it.

    It holds the call's limiter slot (if any) and its timing. Two one-item lists
    settle the races between the task and the worker without a lock, since
    ``list.pop`` is atomic: whoever pops ``_start`` first owns the start (the worker
    runs the body, or the task drops it); whoever pops ``_end`` first is first at the
    end, and the other one finishes the job (the worker wakes the task or gives the
    slot back; the task gives the slot back itself).
    """

    __slots__ = ("_end", "_start", "ended", "limiter", "started", "waker")

    def __init__(self, limiter: anyio.CapacityLimiter | None) -> None:
        self.limiter = limiter
        self._start: list[None] = [None]
        self._end: list[None] = [None]
        self.started = 0.0
        self.ended = 0.0
        self.waker: Callable[[], object] | None = None

    async def acquire(self) -> None:
        """Take a slot of the limiter, if there is one."""
        limiter = self.limiter
        if limiter is None:
            return
        try:
            # No loop round trip when a slot is free (anyio checkpoints right after).
            limiter.acquire_on_behalf_of_nowait(self)
        except anyio.WouldBlock:
            await limiter.acquire_on_behalf_of(self)

    def release(self) -> None:
        """Give the slot back, if one is held."""
        if self.limiter is not None:
            with contextlib.suppress(Exception):
                self.limiter.release_on_behalf_of(self)

    def claim_start(self) -> bool:
        """Return whether this caller is the first to claim the start of the call."""
        return _first(self._start)

    def finish(self, *_: object) -> None:
        """The body has returned (any thread)."""
        if not _first(self._end):
            waker = self.waker  # the task left first, and left this behind
            if waker is not None:
                waker()

    def report(self, submitted: float, attributes: metrics.Attributes) -> None:
        """Record the call's wait and run durations, if its body ran."""
        if self.ended:
            metrics.record(metrics.OFFLOAD_WAIT_DURATION, self.started - submitted, attributes)
            metrics.record(metrics.OFFLOAD_RUN_DURATION, self.ended - self.started, attributes)

    async def stop_waiting(self, exc: BaseException, cancellable: bool) -> None:
        """The task stops waiting for a worker thread because of ``exc``."""
        if self.claim_start():
            self.release()  # the body never started, and now never will
            return
        if not cancellable and isinstance(exc, anyio.get_cancelled_exc_class()):
            # See the body through, whatever cancellation arrives meanwhile.
            done = anyio.Event()
            soon = threadsafe_scheduler()
            self.waker = lambda: soon(done.set)
            if _first(self._end):
                await shielded_wait(done)
        self.leave()

    def leave(self) -> None:
        """Give the slot back now if the body has returned, else when it returns."""
        if self.limiter is None:
            return
        soon = threadsafe_scheduler()
        self.waker = lambda: soon(self.release)
        if not _first(self._end):
            self.release()


def _first(claim: list[None]) -> bool:
    """Take the one item of ``claim``: only the first caller gets it (``list.pop`` is atomic)."""
    try:
        claim.pop()
    except IndexError:
        return False
    return True


class ActiveCalls:
    """Offloaded calls in progress, per attribute set, read when metrics are collected.

    Counting here and observing at collection time keeps two metric updates per call
    off the hot path (with an SDK, each costs several microseconds). Each attribute
    set has a list with one item per call in progress: ``append`` and ``pop`` are
    atomic, so calls from loops in several threads need no lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[tuple[tuple[str, str | bool | int | float], ...], list[None]] = {}
        self._watched = False

    def slot(self, attributes: metrics.Attributes) -> list[None]:
        """The list that counts the calls with these attributes."""
        key = tuple(sorted(attributes.items()))
        with self._lock:
            if not self._watched:
                self._watched = True
                metrics.observe(metrics.OFFLOAD_ACTIVE, self.values)
            return self._calls.setdefault(key, [])

    def values(self) -> list[tuple[float, metrics.Attributes | None]]:
        """The number of calls in progress, per attribute set."""
        with self._lock:
            return [(len(calls), dict(key)) for key, calls in self._calls.items()]


active = ActiveCalls()
"""The calls in progress of every decorated function."""
