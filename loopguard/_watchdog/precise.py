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
from collections.abc import Callable
from typing import Any

from ..events import Frame, SlowCallback

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
        self._set_slow: Callable[[float], None] = lambda _: None

    def add(self, owner: object, slow: float, threshold: float) -> None:
        """Start timing for a watchdog (installs the hook for the first one)."""
        with self._lock:
            self._users[id(owner)] = (slow, threshold)
            self._recompute()

    def remove(self, owner: object) -> None:
        """Stop timing for a watchdog (removes the hook after the last one)."""
        with self._lock:
            self._users.pop(id(owner), None)
            self._recompute()

    def _recompute(self) -> None:
        """Derive the limits from the users; install or remove the hook.

        The hook goes in for the first user and comes out after the last, and only
        if it is still ours: a later patch of someone else stays.
        """
        if self._users:
            self.slow = min(s for s, _ in self._users.values())
            self.limit = max(t for _, t in self._users.values())
            if self._installed is None:
                self._install()
            self._set_slow(self.slow)
        else:
            self.slow = self.limit = float("inf")
            if self._installed is not None:
                if _HANDLE.__dict__.get("_run") is self._installed:
                    _HANDLE._run = _ORIGINAL_RUN  # type: ignore[method-assign]
                self._installed = None

    def _install(self) -> None:
        notes = self.notes
        slow = self.slow  # a closure variable: the cheapest read in the hot path
        perf = _perf

        def set_slow(value: float) -> None:
            nonlocal slow
            slow = value

        # Hot path: one call per callback. asyncio's own body is inlined (it is one
        # line), so the only additions are two clock reads and a comparison; an
        # exception goes to asyncio's own handler, as it would without loopguard.
        def _run(self: asyncio.Handle) -> None:
            started = perf()
            try:
                self._context.run(self._callback, *self._args)  # type: ignore[attr-defined]
            except BaseException as exc:
                _report(self, exc)  # re-raises SystemExit and KeyboardInterrupt
            took = perf() - started
            if took >= slow:
                with contextlib.suppress(Exception):  # never raise into the loop
                    notes.append((time.monotonic(), took, describe(self, took)))

        _run.__qualname__ = "Handle._run"
        _run.__doc__ = _ORIGINAL_RUN.__doc__
        _HANDLE._run = _run  # type: ignore[method-assign]
        self._installed = _run
        self._set_slow = set_slow

    def drain(self) -> list[tuple[float, SlowCallback]]:
        """Take every noted slow callback with its end time (called by sampler threads)."""
        out: list[tuple[float, SlowCallback]] = []
        while True:
            try:
                ended, _, event = self.notes.popleft()
            except IndexError:
                return out
            out.append((ended, event))


class _Raise:
    """Stands in for a handle's context: raises what the callback raised, once.

    After that it runs code in the real context, as asyncio (3.12+) does with the
    loop's exception handler while reporting the error.
    """

    __slots__ = ("context", "exc")

    def __init__(self, context: Any, exc: BaseException) -> None:
        self.context = context
        self.exc: BaseException | None = exc

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        exc, self.exc = self.exc, None
        if exc is not None:
            raise exc
        return self.context.run(fn, *args, **kwargs)


def _report(handle: asyncio.Handle, exc: BaseException) -> None:
    """Let asyncio's own ``Handle._run`` report a callback's exception, unchanged.

    Its handler formats the callback, builds the context (with this very handle) and
    calls the loop's exception handler; it re-raises ``SystemExit`` and
    ``KeyboardInterrupt``. It only needs ``_context.run`` to raise the exception.
    """
    context = handle._context  # type: ignore[attr-defined]
    handle._context = _Raise(context, exc)  # type: ignore[attr-defined]
    try:
        _ORIGINAL_RUN(handle)
    finally:
        handle._context = context  # type: ignore[attr-defined]


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
