"""Loop statistics: busy/idle time, iterations, pending callbacks and live tasks.

Opt-in (``install(stats=True)``) because measuring busy time means timing every
loop iteration. On asyncio's selector loops the loop's own ``selector.select`` is
wrapped (on that loop's selector instance only): time inside it is idle, time
between two calls is the iteration's work. uvloop runs its iterations in C and
exposes neither its selector nor its ready queue, so only the task count is
available there; on trio the run loop's own statistics are read by the heartbeat.

=================  =======  ======  ====
statistic          asyncio  uvloop  trio
=================  =======  ======  ====
utilization/time   yes      no      no
iterations, max    yes      no      no
pending callbacks  yes      no      yes
tasks              yes      yes     yes
=================  =======  ======  ====
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["LoopStats", "LoopStatsSnapshot"]

_perf = time.perf_counter


@dataclass(frozen=True)
class LoopStatsSnapshot:
    """Statistics of one loop since the previous snapshot of it.

    Attributes:
        loop: ``"asyncio"``, ``"uvloop"`` or ``"trio"``.
        thread: Name of the loop's thread.
        active: Seconds spent running callbacks (``None`` where not measurable).
        idle: Seconds spent waiting for I/O or timers (``None`` where not measurable).
        utilization: ``active / (active + idle)`` (``None`` where not measurable).
        iterations: Loop iterations (``None`` where not measurable).
        max_iteration: Longest iteration's work, in seconds (``None`` likewise).
        pending_callbacks: Callbacks ready to run now (``None`` where not available).
        tasks: Live tasks (``None`` where not available).
    """

    loop: str
    thread: str
    active: float | None
    idle: float | None
    utilization: float | None
    iterations: int | None
    max_iteration: float | None
    pending_callbacks: int | None
    tasks: int | None


class LoopStats:
    """Collects statistics for one loop; read from any thread with :meth:`snapshot`."""

    def __init__(self, loop: Any, kind: str, thread: str) -> None:
        self.loop = loop
        self.kind = kind
        self.thread = thread
        self.active = 0.0
        self.idle = 0.0
        self.iterations = 0
        self.max_iteration = 0.0
        self._last_return = _perf()
        self._read: dict[str, tuple[float, float, int, float]] = {}
        self._selector: Any = None
        self._wrapper: Any = None
        self.trio_stats: Any = None  # latest trio.lowlevel.current_statistics()
        self.timed = False

    def start(self) -> None:
        """Start timing iterations where the loop allows it (asyncio selector loops)."""
        selector: Any = getattr(self.loop, "_selector", None)
        select = getattr(selector, "select", None)
        if self.kind != "asyncio" or select is None:
            return

        def timed_select(timeout: float | None = None) -> Any:
            entered = _perf()
            work = entered - self._last_return
            self.active += work
            if work > self.max_iteration:
                self.max_iteration = work
            try:
                return select(timeout)
            finally:
                left = _perf()
                self.idle += left - entered
                self.iterations += 1
                self._last_return = left

        selector.select = timed_select
        self._selector, self._wrapper = selector, timed_select
        self.timed = True

    def stop(self) -> None:
        """Remove the select wrapper if it is still the one in place."""
        selector, self._selector = self._selector, None
        if selector is not None and vars(selector).get("select") is self._wrapper:
            del selector.select
        self._wrapper = None

    def snapshot(self, reader: str) -> LoopStatsSnapshot:
        """Return the statistics since this reader's previous snapshot.

        Args:
            reader: Who reads (each reader has its own "previous"), e.g. ``"api"``.
        """
        active = idle = utilization = max_iteration = None
        iterations = None
        if self.timed:
            a, i, n = self.active, self.idle, self.iterations
            pa, pi, pn, _ = self._read.get(reader, (0.0, 0.0, 0, 0.0))
            self._read[reader] = (a, i, n, 0.0)
            active, idle, iterations = a - pa, i - pi, n - pn
            utilization = active / (active + idle) if active + idle > 0 else 0.0
            max_iteration = self.max_iteration
            if reader == "api":
                self.max_iteration = 0.0
        return LoopStatsSnapshot(
            loop=self.kind,
            thread=self.thread,
            active=active,
            idle=idle,
            utilization=utilization,
            iterations=iterations,
            max_iteration=max_iteration,
            pending_callbacks=self._pending(),
            tasks=self._tasks(),
        )

    def _pending(self) -> int | None:
        if self.kind == "trio":
            stats = self.trio_stats
            return int(stats.tasks_runnable) if stats is not None else None
        ready = getattr(self.loop, "_ready", None)
        return len(ready) if ready is not None else None

    def _tasks(self) -> int | None:
        if self.kind == "trio":
            stats = self.trio_stats
            return int(stats.tasks_living) if stats is not None else None
        try:
            return len(asyncio.all_tasks(self.loop))
        except Exception:
            return None
