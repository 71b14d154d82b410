"""Bounded statistics kept by the watchdog: the loop-delay histogram and stall summary.

Both are fixed-size whatever the run length: the histogram has a fixed set of
log-spaced buckets; the summary keeps at most ``max_culprits`` culprits. The summary
also renders its tables, for the summary printed at exit and for ``loopguard report``
alike.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from .._core.frames import where
from ..events import BlockingCall, Frame, Stall

__all__ = ["CallSiteStats", "CulpritStats", "DelayHistogram", "StallSummary"]

_STEPS_PER_OCTAVE = 4
_MIN = 1e-5  # 10 µs: anything below lands in the first bucket
_BUCKETS = 100  # up to ~ _MIN * 2**25 ≈ 335 s
_MAX_ROWS = 20  # rows per table of a printed summary


class DelayHistogram:
    """Log-bucketed histogram of loop delay (seconds), safe to read from another thread.

    Percentiles are reported as the upper bound of their bucket (within 19 %); the
    maximum is exact.
    """

    __slots__ = ("_counts", "count", "max", "sum")

    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def record(self, value: float) -> None:
        """Add one observation (negative values count as zero)."""
        if value <= _MIN:
            index = 0
        else:
            index = min(_BUCKETS - 1, int(math.log2(value / _MIN) * _STEPS_PER_OCTAVE) + 1)
        self._counts[index] += 1
        self.count += 1
        if value > 0:
            self.sum += value
            if value > self.max:
                self.max = value

    def merge(self, other: DelayHistogram) -> None:
        """Add another histogram's observations to this one."""
        for i, n in enumerate(other._counts):
            self._counts[i] += n
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float:
        """Return the ``q``-th percentile (0-100) in seconds, 0.0 when empty."""
        if not self.count:
            return 0.0
        rank = q / 100.0 * self.count
        seen = 0
        for i, n in enumerate(self._counts):
            seen += n
            if seen >= rank and n:
                upper = _MIN * 2 ** (i / _STEPS_PER_OCTAVE)
                return min(upper, self.max)
        return self.max


@dataclass
class CulpritStats:
    """Stalls attributed to one culprit."""

    culprit: Frame | None
    count: int = 0
    total: float = 0.0
    max: float = 0.0


@dataclass
class CallSiteStats:
    """Blocking calls of one function made from one culprit line."""

    function: str
    culprit: Frame | None
    count: int = 0  # calls, including those the per-site rate limit kept from events
    total: float = 0.0  # seconds, of the calls reported as events


class StallSummary:
    """Stalls grouped by culprit, and blocking calls by site; bounded in size.

    Args:
        max_culprits: Distinct culprits (and call sites) kept; later ones are
            grouped as "other".
    """

    def __init__(self, max_culprits: int = 200) -> None:
        self.max_culprits = max_culprits
        self._by: dict[Frame | None, CulpritStats] = {}
        self._other = CulpritStats(None)
        self._calls: dict[tuple[str, Frame | None], CallSiteStats] = {}
        self._other_calls = CallSiteStats("other", None)
        self._startup: dict[Frame | None, CulpritStats] = {}  # cause "import": not user stalls
        self._lock = threading.Lock()

    def emit(self, event: object) -> None:
        """Count a stall or a blocking call (other events are ignored), as a sink."""
        if isinstance(event, BlockingCall):
            self._count_call(event)
            return
        if not isinstance(event, Stall):
            return
        with self._lock:
            by = self._startup if event.cause == "import" else self._by
            stats = by.get(event.culprit)
            if stats is None:
                if len(by) >= self.max_culprits:
                    stats = self._other
                else:
                    stats = by[event.culprit] = CulpritStats(event.culprit)
            stats.count += 1
            stats.total += event.duration
            stats.max = max(stats.max, event.duration)

    def _count_call(self, event: BlockingCall) -> None:
        key = (event.function, event.culprit)
        with self._lock:
            site = self._calls.get(key)
            if site is None:
                if len(self._calls) >= self.max_culprits:
                    site = self._other_calls
                else:
                    site = self._calls[key] = CallSiteStats(event.function, event.culprit)
            site.count += 1 + event.suppressed
            site.total += event.duration

    def call_rows(self) -> list[CallSiteStats]:
        """Blocking-call sites, most calls first."""
        with self._lock:
            rows = list(self._calls.values())
            if self._other_calls.count:
                rows.append(self._other_calls)
        return sorted(rows, key=lambda r: (r.count, r.total), reverse=True)

    def rows(self) -> list[CulpritStats]:
        """Culprits by total stalled time, longest first."""
        with self._lock:
            rows = list(self._by.values())
            if self._other.count:
                rows.append(self._other)
        return sorted(rows, key=lambda r: r.total, reverse=True)

    def totals(self) -> tuple[int, float]:
        """The number of stalls and the seconds stalled, over every culprit."""
        rows = self.rows()
        return sum(r.count for r in rows), sum(r.total for r in rows)

    def table_lines(self, max_rows: int = _MAX_ROWS) -> list[str]:
        """The summary's tables as text lines: stalls by culprit, start-up, blocking calls by site.

        Args:
            max_rows: Rows shown per table; a last line says how many more there are.

        Returns:
            The lines (indented by two spaces), empty when nothing was counted.
        """
        stalls = [
            f"  {r.count:>5}  {r.total:>7.3f}s  {r.max:>7.3f}s  "
            + (where(r.culprit) if r.culprit else "(not sampled / other)")
            for r in self.rows()
        ]
        calls = self.call_rows()
        sites = [
            f"  {c.count:>5}  {c.total:>7.3f}s  {c.function}, "
            + (where(c.culprit) if c.culprit else "(unknown)")
            for c in calls
        ]
        lines: list[str] = []
        if stalls:
            lines.append(f"  {'count':>5}  {'total':>8}  {'max':>8}  culprit")
            lines += _capped(stalls, "culprits", max_rows)
        lines += [
            f"  start-up (import inside the loop): {r.count} stall(s), {r.total:.3f} s, at "
            + (where(r.culprit) if r.culprit else "(not sampled)")
            for r in self.startup_rows()
        ]
        if sites:
            lines.append(f"  {sum(c.count for c in calls)} blocking call(s) on the loop thread")
            lines.append(f"  {'count':>5}  {'total':>8}  call, culprit")
            lines += _capped(sites, "call sites", max_rows)
        return lines

    def startup_rows(self) -> list[CulpritStats]:
        """Start-up stalls (imports run inside the loop), longest first; not in :meth:`rows`."""
        with self._lock:
            rows = list(self._startup.values())
        return sorted(rows, key=lambda r: r.total, reverse=True)


def _capped(rows: list[str], noun: str, limit: int) -> list[str]:
    """The first rows of a table, and how many more there were."""
    if len(rows) <= limit:
        return rows
    return [*rows[:limit], f"  ... {len(rows) - limit} more {noun}"]
