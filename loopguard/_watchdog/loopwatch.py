"""One watched loop: the heartbeat state its loop writes and the sampler reads.

A :class:`LoopWatch` is created when a watchdog attaches to a loop. On asyncio and
uvloop its heartbeat is a ``call_later`` timer re-armed each tick; on trio it is the
system task :func:`trio_beat`. :class:`Ongoing` is the sampler's record of a stall
while it lasts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..events import Frame
from ..metrics import EVENTLOOP_DELAY
from ..metrics import record as _record
from .capture import CAPTURE
from .causes import CpuSnapshot
from .loopstats import LoopStats
from .registry import watches_of
from .sampling import StackFolder
from .summary import DelayHistogram

if TYPE_CHECKING:
    from .watchdog import Watchdog

__all__ = ["LoopWatch", "Ongoing", "run_queue_wait", "trio_beat"]

_monotonic = time.monotonic
_board_tick = CAPTURE.board.tick
#: Task names kept per stall (``Stall.tasks``).
MAX_TASKS = 8

#: Heartbeats kept for loop_load() (a minute at the default 20 ms period).
RECENT_HEARTBEATS = 3000
#: Busy/idle marks kept, one every MARK_EVERY seconds (a minute).
RECENT_MARKS = 240
MARK_EVERY = 0.25


class LoopWatch:
    """One watched loop: heartbeat state written by the loop, read by the sampler."""

    __slots__ = (
        "attached",
        "delay",
        "detached_at",
        "handle",
        "is_running",
        "kind",
        "last_tick",
        "loop",
        "marks",
        "native_id",
        "next_mark",
        "ongoing",
        "pending",
        "period",
        "recent",
        "reports",
        "running_task",
        "slot",
        "stats",
        "thread_id",
        "thread_name",
        "threshold",
    )

    def __init__(self, wd: Watchdog, loop: Any, kind: str) -> None:
        self.loop = loop
        self.kind = kind
        self.period = wd.config.period
        self.threshold = wd.config.threshold
        self.thread_id = threading.get_ident()
        self.native_id = threading.get_native_id()
        self.thread_name = threading.current_thread().name
        self.last_tick = _monotonic()
        # This loop's place on the capture helper's heartbeat board (-1: none).
        self.slot = CAPTURE.board.take(self.last_tick) if wd.config.gil_dump else -1
        self.pending: list[tuple[float, float]] = []  # (end, gap) of long gaps, loop-written
        self.delay = DelayHistogram()
        # The recent past, for loopguard.loop_load(): each heartbeat's lateness, and
        # every MARK_EVERY seconds the loop's busy/idle totals (when stats are on).
        self.recent: deque[tuple[float, float]] = deque(maxlen=RECENT_HEARTBEATS)
        self.marks: deque[tuple[float, float, float]] = deque(maxlen=RECENT_MARKS)
        self.next_mark = 0.0
        self.handle: Any = None
        self.attached = True
        self.detached_at = 0.0
        self.ongoing: Ongoing | None = None  # sampler-only state
        # One watchdog reports a loop's metrics, so two on one loop do not count twice;
        # when it stops, another one watching the loop takes over (registry.hand_over).
        self.reports: bool = not any(w.reports for w in watches_of(loop) if w.attached)
        self.stats: LoopStats | None = None
        if wd.config.stats:
            self.stats = LoopStats(loop, kind, self.thread_name)
            self.stats.start()
        if kind == "trio":
            self.is_running: Callable[[], bool] = lambda: self.attached
            self.running_task: Callable[[], Any] = lambda: None
        else:
            self.is_running = loop.is_running
            self.running_task = self._asyncio_task

    def stamp(self) -> None:
        """Record a heartbeat (runs on the loop thread)."""
        now = _monotonic()
        gap = now - self.last_tick
        self.last_tick = now
        if self.slot >= 0:
            _board_tick(self.slot, now)
        late = gap - self.period
        self.delay.record(late)
        self.recent.append((now, late))
        if now >= self.next_mark and self.stats is not None and self.stats.timed:
            self.next_mark = now + MARK_EVERY
            active, idle = self.stats.totals()
            self.marks.append((now, active, idle))
        if self.reports:
            _record(EVENTLOOP_DELAY, late if late > 0.0 else 0.0)
        if gap >= self.threshold and len(self.pending) < 64:
            self.pending.append((now, gap))

    def asyncio_tick(self) -> None:
        """Heartbeat callback on asyncio/uvloop: stamp and re-arm."""
        if not self.attached:
            return
        self.stamp()
        self.handle = self.loop.call_later(self.period, self.asyncio_tick)

    def _asyncio_task(self) -> asyncio.Task[Any] | None:
        try:
            return asyncio.current_task(self.loop)
        except Exception:
            return None

    def take_pending(self) -> list[tuple[float, float]]:
        items, self.pending = self.pending, []
        return items


async def trio_beat(watch: LoopWatch) -> None:
    """The heartbeat of a trio run: a system task that stamps while the watch lasts."""
    import trio

    while watch.attached:
        await trio.sleep(watch.period)
        if watch.attached:
            watch.stamp()
            if watch.stats is not None:
                watch.stats.trio_stats = trio.lowlevel.current_statistics()


def run_queue_wait(native_id: int) -> float | None:
    """Seconds the thread has spent runnable but waiting for a CPU (Linux schedstat)."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", "rb") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


class Ongoing:
    """A stall the sampler is watching while it lasts."""

    __slots__ = (
        "after_gap",
        "attributes",
        "before",
        "folder",
        "max_gap",
        "others",
        "queued",
        "task",
        "tasks",
        "tick",
    )

    def __init__(self, tick: float, before: CpuSnapshot | None) -> None:
        self.tick = tick
        self.before = before  # CPU clocks at the sampler's last wake before the stall
        self.folder = StackFolder()
        self.others: dict[int, tuple[Frame, ...]] | None = None
        self.task: str | None = None
        self.attributes: dict[str, str] = {}
        self.max_gap = 0.0  # the longest the sampler went without running, seconds
        self.after_gap = 0  # samples taken right after such a gap (the loop held the GIL)
        self.queued: tuple[float, float] | None = None  # (when, run-queue wait) at start
        self.tasks: dict[str, None] = {}  # tasks seen running, in order (bounded)

    def saw(self, task: str | None) -> None:
        """Note a task seen running on the loop during the stall."""
        if task is not None and len(self.tasks) < MAX_TASKS:
            self.tasks[task] = None
