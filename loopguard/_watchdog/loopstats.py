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
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["LONG_ITERATION", "LoopStats", "LoopStatsSnapshot"]

_perf = time.perf_counter

#: An iteration whose work takes at least this long (seconds) is kept, with the time it
#: began, in :attr:`LoopStats.long_iterations`: what a request arriving then waited.
LONG_ITERATION = 0.0005
#: How many long iterations are kept (a loop busy with nothing but them fills this in
#: about a second; readers then look back over what is kept).
LONG_KEPT = 2048


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
        self._read: dict[str, tuple[float, float, int]] = {}
        self._retired = (0.0, 0.0)
        self._selector: Any = None
        self._wrapper: Any = None
        # (reset longest?) -> (active, idle, iterations, longest iteration's work)
        self._totals: Any = None
        self.trio_stats: Any = None  # latest trio.lowlevel.current_statistics()
        self.timed = False
        # (perf_counter when the work began, seconds of work) of iterations whose work
        # took at least LONG_ITERATION; appended on the loop thread, read from any.
        self.long_iterations: deque[tuple[float, float]] = deque(maxlen=LONG_KEPT)

    def start(self) -> None:
        """Start timing iterations where the loop allows it (asyncio selector loops)."""
        selector: Any = getattr(self.loop, "_selector", None)
        select = getattr(selector, "select", None)
        if self.kind != "asyncio" or select is None:
            return
        perf = _perf
        # Closure variables, not attributes: this runs once per loop iteration.
        active = idle = longest = 0.0
        iterations = 0
        left = perf()
        long_iterations = self.long_iterations
        floor = LONG_ITERATION

        def timed_select(timeout: float | None = None) -> Any:
            nonlocal active, idle, longest, iterations, left
            entered = perf()
            work = entered - left
            active += work
            if work > longest:
                longest = work
            if work >= floor:
                long_iterations.append((left, work))
            events = select(timeout)  # if it raises, the loop stops anyway
            left = perf()
            idle += left - entered
            iterations += 1
            return events

        def totals(reset_longest: bool) -> tuple[float, float, int, float]:
            nonlocal longest
            out = (active, idle, iterations, longest)
            if reset_longest:
                longest = 0.0
            return out

        selector.select = timed_select
        self._selector, self._wrapper, self._totals = selector, timed_select, totals
        self.timed = True

    def stop(self) -> None:
        """Remove the select wrapper if it is still the one in place."""
        selector, self._selector = self._selector, None
        if selector is not None and vars(selector).get("select") is self._wrapper:
            del selector.select
        self._wrapper = None

    def totals(self) -> tuple[float, float]:
        """Seconds active and idle since timing began, less what :meth:`retire` took."""
        if not self.timed:
            return 0.0, 0.0
        active, idle, _, _ = self._totals(False)
        return active - self._retired[0], idle - self._retired[1]

    def retire(self) -> tuple[float, float]:
        """Return :meth:`totals` and count them as taken (a loop that ended)."""
        active, idle = self.totals()
        self._retired = (self._retired[0] + active, self._retired[1] + idle)
        return active, idle

    def snapshot(self, reader: str) -> LoopStatsSnapshot:
        """Return the statistics since this reader's previous snapshot.

        Args:
            reader: Who reads (each reader has its own "previous"), e.g. ``"api"``.
        """
        active = idle = utilization = max_iteration = None
        iterations = None
        if self.timed:
            # The longest iteration's work: since the previous "api" read (which resets it).
            a, i, n, max_iteration = self._totals(reader == "api")
            pa, pi, pn = self._read.get(reader, (0.0, 0.0, 0))
            self._read[reader] = (a, i, n)
            active, idle, iterations = a - pa, i - pi, n - pn
            utilization = active / (active + idle) if active + idle > 0 else 0.0
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
