"""Precise mode: time every callback on pure-Python asyncio loops.

``asyncio.events.Handle._run`` (every callback and task step of asyncio's own
loops goes through it) is replaced, while a precise watchdog runs, by a plain
function that reads the clock before and after. A callback that took at least
``slow_callback`` but less than the stall threshold is noted in a bounded queue on
the loop thread and turned into a :class:`~loopguard.events.SlowCallback` by the
sampler thread; longer ones are left to the watchdog, so no stall is reported twice.

uvloop runs callbacks in C and has no such hook: precise mode says so once and the
watchdog alone covers uvloop loops.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from typing import Any

from .events import Frame, SlowCallback

__all__ = ["PreciseTimer", "describe"]

_perf = time.perf_counter
_HANDLE = asyncio.events.Handle
_ORIGINAL_RUN = _HANDLE.__dict__["_run"]

# Notes of slow callbacks: (duration, handle description, thread name). Bounded.
_MAX_NOTES = 1000


class PreciseTimer:
    """Process-wide per-callback timing shared by every precise watchdog."""

    def __init__(self) -> None:
        self._users: dict[int, tuple[float, float]] = {}  # id(watchdog) -> (slow, threshold)
        self._lock = threading.Lock()
        self.notes: collections.deque[tuple[float, float, SlowCallback]] = collections.deque(
            maxlen=_MAX_NOTES
        )
        self.slow = float("inf")
        self.limit = float("inf")
        self._installed: Any = None

    def add(self, owner: object, slow: float, threshold: float) -> None:
        """Start timing for a watchdog (installs the hook for the first one)."""
        with self._lock:
            self._users[id(owner)] = (slow, threshold)
            self._recompute()
            if self._installed is None:
                self._install()

    def remove(self, owner: object) -> None:
        """Stop timing for a watchdog (removes the hook after the last one)."""
        with self._lock:
            self._users.pop(id(owner), None)
            self._recompute()
            if not self._users and self._installed is not None:
                if _HANDLE.__dict__.get("_run") is self._installed:
                    _HANDLE._run = _ORIGINAL_RUN  # type: ignore[method-assign]
                self._installed = None

    def _recompute(self) -> None:
        if self._users:
            self.slow = min(s for s, _ in self._users.values())
            self.limit = max(t for _, t in self._users.values())
        else:
            self.slow = self.limit = float("inf")

    def _install(self) -> None:
        timer = self
        notes = self.notes
        original = _ORIGINAL_RUN
        perf = _perf

        def _run(handle: asyncio.Handle) -> None:
            started = perf()
            original(handle)
            took = perf() - started
            if took >= timer.slow:
                with contextlib.suppress(Exception):  # never raise into the loop
                    notes.append((time.monotonic(), took, describe(handle, took)))

        _run.__qualname__ = "Handle._run"
        _run.__doc__ = original.__doc__
        _HANDLE._run = _run  # type: ignore[method-assign,assignment]
        self._installed = _run

    def drain(self) -> list[tuple[float, SlowCallback]]:
        """Take every noted slow callback with its end time (called by sampler threads)."""
        out: list[tuple[float, SlowCallback]] = []
        while True:
            try:
                ended, _, event = self.notes.popleft()
            except IndexError:
                return out
            out.append((ended, event))


def describe(handle: asyncio.Handle, took: float) -> SlowCallback:
    """Describe what a handle ran, without keeping it (runs on the loop thread)."""
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    task_name = None
    code = None
    name = getattr(callback, "__qualname__", None) or repr(callback)
    if isinstance(owner, asyncio.Task):
        task_name = owner.get_name()
        coro = owner.get_coro()
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        name = getattr(coro, "__qualname__", None) or name
    else:
        code = getattr(callback, "__code__", None)
        if code is None:
            code = getattr(getattr(callback, "func", None), "__code__", None)  # partial
    culprit = None
    if code is not None:
        culprit = Frame(code.co_filename, code.co_firstlineno, getattr(code, "co_qualname", name))
    return SlowCallback(
        duration=round(took, 6),
        callback=str(name),
        task=task_name,
        culprit=culprit,
        thread=threading.current_thread().name,
    )


#: The one process-wide timer.
TIMER = PreciseTimer()
