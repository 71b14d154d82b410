"""Garbage-collection pauses: when the collector ran, how long, which generation.

A full collection of a large heap holds the GIL for tens or hundreds of
milliseconds. To the watchdog that looks like C code holding the GIL on whichever
line happened to allocate at that moment, so the pause would be blamed on innocent
code. ``gc.callbacks`` tells when each collection starts and stops; this module keeps
the recent pauses long enough to be worth reporting, and the watchdog asks which
of them fell inside a stall.

The callback is installed while at least one watchdog runs. It costs two short
Python calls per collection (young collections are frequent, so it does as little
as possible) and keeps at most :data:`_KEEP` pauses.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import deque
from typing import Any

from ..events import GcPause

__all__ = ["GC", "GcWatch"]

# Collections shorter than this are not remembered: they never explain a stall.
_MIN_PAUSE = 0.002
_KEEP = 64


class GcWatch:
    """Records recent garbage-collection pauses through ``gc.callbacks`` (refcounted)."""

    def __init__(self) -> None:
        # (start, end, generation, collected); appended by the collecting thread,
        # read by the sampler. deque appends and copies are atomic under the GIL.
        self._pauses: deque[tuple[float, float, int, int]] = deque(maxlen=_KEEP)
        self._started = 0.0
        self._users = 0
        self._lock = threading.Lock()
        clock = time.monotonic
        pauses = self._pauses

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                self._started = clock()
                return
            end = clock()
            if end - self._started >= _MIN_PAUSE:
                pauses.append(
                    (self._started, end, info.get("generation", -1), info.get("collected", 0))
                )

        self._callback = on_gc

    def start(self) -> None:
        """Install the callback (once, however many watchdogs start)."""
        with self._lock:
            self._users += 1
            if self._users == 1 and self._callback not in gc.callbacks:
                gc.callbacks.append(self._callback)

    def stop(self) -> None:
        """Remove the callback when the last user stops."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                while self._callback in gc.callbacks:
                    gc.callbacks.remove(self._callback)
                self._pauses.clear()

    def within(self, start: float, end: float) -> GcPause | None:
        """The collections that ran between ``start`` and ``end`` (monotonic), summed.

        Returns:
            ``None`` when no collection worth reporting overlapped the window; else
            the time spent collecting inside it, the number of collections, the
            oldest generation collected and the objects freed.
        """
        pause = 0.0
        count = collected = 0
        generation = -1
        for began, ended, gen, freed in list(self._pauses):
            overlap = min(ended, end) - max(began, start)
            if overlap <= 0:
                continue
            pause += overlap
            count += 1
            collected += freed
            generation = max(generation, gen)
        if not count:
            return None
        return GcPause(
            pause=round(pause, 6), collections=count, generation=generation, collected=collected
        )

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


#: The process's one recorder, shared by every watchdog.
GC = GcWatch()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=GC._after_fork_in_child)
