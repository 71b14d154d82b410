"""How loaded a loop has been lately: heartbeat delay percentiles and utilization.

Read by :func:`loopguard.loop_load` (for load shedding, health checks, autoscaling
signals) from the recent heartbeats a :class:`~loopguard._watchdog.loopwatch.LoopWatch`
keeps: each heartbeat's lateness, and, when loop statistics are on, marks of the
loop's busy/idle totals and its long iterations. Nothing here runs on the loop's hot
path; a reading sorts at most the heartbeats (or long iterations) of the window.

How long the loop was *held* (ran without polling for I/O) is best read from the
iterations themselves: a heartbeat sees only the part of a stretch after it fell
due, on average half of a stretch no longer than its period. So with loop statistics
the held stretches are the long iterations' work, without them the heartbeats'
lateness.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections import deque

    from .loopwatch import LoopWatch

__all__ = ["MAX_WINDOW", "LoopLoad", "lag_of", "load_of", "wait_percentile"]

#: The longest window :func:`load_of` can look back over, in seconds.
MAX_WINDOW = 60.0


@dataclass(frozen=True)
class LoopLoad:
    """One loop's load over a recent window.

    Attributes:
        window: Seconds the reading covers (at most the window asked for; less
            while the loop is younger than that).
        heartbeats: Heartbeats in the window; 0 means no delay was measured.
        delay_p50: Median heartbeat lateness, in seconds.
        delay_p99: 99th percentile of heartbeat lateness, in seconds.
        delay_max: Largest heartbeat lateness, in seconds.
        wait_p99: 99th percentile of the wait of a request arriving at a random
            moment of the window, in seconds: the time-weighted counterpart of
            ``delay_p99``. A stall contributes one late heartbeat to the percentiles
            but a wait to every arrival during it, so a loop blocked 20 ms twice a
            second (4 % of the time) has a ``delay_p99`` under 10 ms with a 20 ms
            heartbeat, yet more than 1 % of arrivals wait over 10 ms. Computed from
            ``held``; load shedding uses this one.
        utilization: Share of the window the loop spent running callbacks
            (0-1), or ``None`` without loop statistics (``stats=True``) or on loops
            where they cannot be measured (uvloop, trio).
        lag: How late the loop is right now, in seconds (0 when on time), as
            :func:`loopguard.loop_lag` returns it: the delay building up now, which
            the percentiles see only once the heartbeat runs.
        held: The stretches, in seconds and longest first, in which the loop ran
            without polling for I/O during the window: with loop statistics, each
            iteration whose work took at least 0.5 ms (measured exactly); without
            them, each late heartbeat's lateness (which sees, on average, half of a
            stretch no longer than the heartbeat period). ``wait_p99`` is computed
            from these.
    """

    window: float
    heartbeats: int
    delay_p50: float
    delay_p99: float
    delay_max: float
    utilization: float | None
    lag: float
    wait_p99: float = 0.0
    held: tuple[float, ...] = ()
    # Seconds the shares of wait_share() are taken over (never 0).
    _span: float = field(default=1.0, repr=False, compare=False)

    def wait_share(self, over: float, *, extra: float = 0.0) -> float:
        """The share of the window in which an arrival would have waited over ``over``.

        Args:
            over: The wait, in seconds.
            extra: One more held stretch (seconds) to count, as if it had happened
                in the window: what admitting one more request as long as the
                longest in ``held`` would do.

        Returns:
            A share (0-1; more than 1 only while the reading covers less time than
            the stretches it holds).
        """
        total = sum(h - over for h in self.held if h > over)
        if extra > over:
            total += extra - over
        return total / self._span


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[index]


def wait_percentile(lates: list[float], window: float, q: float) -> float:
    """The ``q``-th percentile of the wait of an arrival at a random moment of the window.

    A heartbeat late by ``late`` seconds stands for a stretch in which the loop ran
    nothing else; an arrival ``t`` seconds into it waits ``late - t``. So the share
    of the window in which an arrival would wait more than ``x`` is
    ``sum(max(0, late - x)) / window``; the percentile is the smallest ``x`` whose
    share is at most ``1 - q/100``.

    Args:
        lates: Heartbeat lateness values of the window, in seconds (any order).
        window: Seconds the values cover (> 0).
        q: The percentile (0-100).

    Returns:
        The wait in seconds (0 when the loop was late less than that share of the
        time in total).
    """
    allowed = (1.0 - q / 100.0) * window
    ordered = sorted((late for late in lates if late > 0.0), reverse=True)
    total = 0.0
    for count, late in enumerate(ordered, start=1):
        total += late
        # With the `count` largest in play, the share is total - count * x.
        x = (total - allowed) / count
        following = ordered[count] if count < len(ordered) else 0.0
        if x >= following:
            return max(0.0, x)
    return 0.0


def lag_of(watch: LoopWatch) -> float:
    """How late the loop is now (0 when on time).

    How late its next heartbeat already is; or, within one heartbeat period after a
    late heartbeat, how late that one was: a request handled right after a stall
    ended still sees the loop as held (a burst of requests that each hold the loop
    for less than a period is otherwise seen as on time between them).
    """
    now = time.monotonic()
    late = now - watch.last_tick - watch.period
    if late > 0.0:
        return late
    try:
        at, was = watch.recent[-1]
    except IndexError:
        return 0.0
    return was if was > 0.0 and now - at < watch.period else 0.0


def load_of(watch: LoopWatch, window: float) -> LoopLoad:
    """The load of one watched loop over the last ``window`` seconds."""
    now = time.monotonic()
    since = now - window
    lates = sorted(max(0.0, late) for at, late in list(watch.recent) if at >= since)
    first = next((at for at, _ in list(watch.recent) if at >= since), now)
    span = max(now - max(first, since), watch.period)
    held = [late for late in lates if late > 0.0]
    utilization: float | None = None
    stats = watch.stats
    if stats is not None and stats.timed:
        held, span = _long_iterations(stats.long_iterations, window, span)
        active, idle = stats.totals()
        marks = list(watch.marks)
        start = next((m for m in marks if m[0] >= since), marks[0] if marks else None)
        if start is not None:
            busy, waiting = active - start[1], idle - start[2]
            if busy + waiting > 0:
                utilization = min(1.0, max(0.0, busy / (busy + waiting)))
    return LoopLoad(
        window=min(window, max(0.0, now - first)) if lates else 0.0,
        heartbeats=len(lates),
        delay_p50=_percentile(lates, 50),
        delay_p99=_percentile(lates, 99),
        delay_max=lates[-1] if lates else 0.0,
        utilization=utilization,
        lag=lag_of(watch),
        wait_p99=wait_percentile(held, span, 99),
        held=tuple(sorted(held, reverse=True)),
        _span=span,
    )


def _long_iterations(
    kept: deque[tuple[float, float]], window: float, span: float
) -> tuple[list[float], float]:
    """The long iterations' work in the window, and the seconds that covers."""
    perf_now = time.perf_counter()
    since = perf_now - window
    iterations = list(kept)
    held = [work for began, work in iterations if began >= since]
    if len(iterations) == kept.maxlen and iterations[0][0] > since:
        # More long iterations than are kept: the reading covers what is kept.
        span = min(span, max(perf_now - iterations[0][0], 1e-3))
    return held, span
