"""How loaded a loop has been lately: heartbeat delay percentiles and utilization.

Read by :func:`loopguard.loop_load` (for load shedding, health checks, autoscaling
signals) from the recent heartbeats a :class:`~loopguard._watchdog.loopwatch.LoopWatch`
keeps: each heartbeat's lateness, and marks of the loop's busy/idle totals when loop
statistics are on. Nothing here runs on the loop's hot path; a reading sorts at most
the heartbeats of the window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loopwatch import LoopWatch

__all__ = ["MAX_WINDOW", "LoopLoad", "lag_of", "load_of"]

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
        utilization: Share of the window the loop spent running callbacks
            (0-1), or ``None`` without loop statistics (``stats=True``) or on loops
            where they cannot be measured (uvloop, trio).
        lag: How late the loop's next heartbeat already is, in seconds (0 when on
            time): the delay building up right now, which the percentiles see only
            once the heartbeat runs (see :func:`loopguard.loop_lag`).
    """

    window: float
    heartbeats: int
    delay_p50: float
    delay_p99: float
    delay_max: float
    utilization: float | None
    lag: float


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[index]


def lag_of(watch: LoopWatch) -> float:
    """How late the watch's next heartbeat already is (0 when on time)."""
    late = time.monotonic() - watch.last_tick - watch.period
    return late if late > 0.0 else 0.0


def load_of(watch: LoopWatch, window: float) -> LoopLoad:
    """The load of one watched loop over the last ``window`` seconds."""
    now = time.monotonic()
    since = now - window
    lates = sorted(max(0.0, late) for at, late in list(watch.recent) if at >= since)
    first = next((at for at, _ in list(watch.recent) if at >= since), now)
    utilization: float | None = None
    stats = watch.stats
    if stats is not None and stats.timed:
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
    )
