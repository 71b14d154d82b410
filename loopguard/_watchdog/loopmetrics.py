"""Loop statistics as metrics: utilization, busy/idle time, pending callbacks, tasks.

Observed (read when the metric reader collects) while some watchdog collects loop
statistics (``stats=True``); loops that ended keep counting in the time totals.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import metrics
from ..metrics import (
    EVENTLOOP_PENDING_CALLBACKS,
    EVENTLOOP_STATE,
    EVENTLOOP_TASKS,
    EVENTLOOP_TIME,
    EVENTLOOP_UTILIZATION,
)
from .loopstats import LoopStats
from .registry import running

__all__ = ["observe_stats", "retire_stats"]

_stats_observed = False
_retired_time = {"active": 0.0, "idle": 0.0}  # loops that ended, for monotonic totals


def _live_stats() -> list[LoopStats]:
    out: list[LoopStats] = []
    for wd in running():
        with wd._lock:
            out.extend(w.stats for w in wd._watches if w.attached and w.stats is not None)
    return out


def retire_stats(stats: LoopStats) -> None:
    active, idle = stats.retire()
    _retired_time["active"] += active
    _retired_time["idle"] += idle


_Reading = list[tuple[float, dict[str, str] | None]]


def _observe_utilization() -> _Reading:
    snaps = [s.snapshot("metrics") for s in _live_stats() if s.timed]
    active = sum(s.active or 0.0 for s in snaps)
    idle = sum(s.idle or 0.0 for s in snaps)
    return [(active / (active + idle), None)] if active + idle > 0 else []


def _observe_time() -> _Reading:
    live = [s.totals() for s in _live_stats()]
    active = _retired_time["active"] + sum(a for a, _ in live)
    idle = _retired_time["idle"] + sum(i for _, i in live)
    return [(active, {EVENTLOOP_STATE: "active"}), (idle, {EVENTLOOP_STATE: "idle"})]


def _observe_sum(field: str) -> Callable[[], _Reading]:
    def observe() -> _Reading:
        values = [getattr(s.snapshot("gauge"), field) for s in _live_stats()]
        known = [v for v in values if v is not None]
        return [(float(sum(known)), None)] if known else []

    return observe


def observe_stats(on: bool) -> None:
    """Report the loop-statistics metrics while some watchdog collects them."""
    global _stats_observed
    if on == _stats_observed:
        return
    _stats_observed = on
    metrics.observe(EVENTLOOP_UTILIZATION, _observe_utilization if on else None)
    metrics.observe(EVENTLOOP_TIME, _observe_time if on else None)
    metrics.observe(EVENTLOOP_PENDING_CALLBACKS, _observe_sum("pending_callbacks") if on else None)
    metrics.observe(EVENTLOOP_TASKS, _observe_sum("tasks") if on else None)
