"""The slow path: a guarded call on a thread that may run an event loop.

Every replacement (generated wrappers, guarded C objects, driver connections) hands
a call here once its fast path found a running loop. This module owns what that
call goes through: the call's probe (does it block at all?), the re-entrancy flag
(:data:`_state`), the running guards (:data:`_running`), each guard's verdict (allow
rules, scope, rate limit), :class:`BlockingCallError`, and the :class:`_Report`
delivered to the guards once the call has run. It also keeps the recent reported
calls the watchdog asks about (:func:`call_during`).

It knows guards only through :class:`_Guard` (what ``BlockingGuard`` offers the slow
path): it sits below the replacements that call it, and they below the guard.
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import logging
import sys
import threading
import time
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, Protocol

from .. import metrics
from .._core.attribution import current_attributes
from .._core.frames import callback_frames, capture, culprit_of, is_own, own_part
from .._core.loops import loop_kind
from ..events import BlockingCall, Frame
from .trio_runs import in_trio_task

logger = logging.getLogger("loopguard")

_STRENGTH = {"record": 1, "warn": 2, "raise": 3}

_grl = asyncio._get_running_loop
_get_ident = _thread.get_ident
_perf_counter = time.perf_counter
_monotonic = time.monotonic


class BlockingCallError(RuntimeError):
    """A blocking call was made on an event loop thread while the guard's mode is ``raise``.

    Raised *before* the call runs, from the line that made it.

    Attributes:
        event: The :class:`~loopguard.BlockingCall` that was reported.
        function: Catalogue name of the refused call (e.g. ``"time.sleep"``).
    """

    def __init__(self, event: BlockingCall) -> None:
        where = f" at {event.culprit}" if event.culprit else ""
        task = f" in task {event.task!r}" if event.task else ""
        super().__init__(
            f"blocking call {event.function}() on the {event.loop} event loop thread "
            f"{event.thread!r}{task}{where}; run it in a worker thread "
            f"(asyncio.to_thread, anyio.to_thread.run_sync) or allow it with an Allow rule"
        )
        self.event = event
        self.function = event.function

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.event,))


BlockingCallError.__module__ = "loopguard"  # how tracebacks name it


# What a probe (or the verdict) says about a call.


class _Run:
    __slots__ = ()


_RUN: Any = _Run()  # the call does not block: run it unguarded
_BLOCKS: Any = object()  # the call would block
_ALLOWED: Any = object()  # it blocks, but is allowed (or no guard wants it)


Probe = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


_AUTO = -2  # _Entry.shape: read the signature


class _Entry:
    """One catalogue name: what the guarded call is called and how to tell it blocks."""

    __slots__ = ("name", "probe", "shape")

    def __init__(self, name: str, probe: Probe | None, shape: int | None = _AUTO) -> None:
        self.name = name
        self.probe = probe
        self.shape = shape  # see wrappers._shape(); given for C functions without a signature


class _State(threading.local):
    busy = False


_state = _State()


class _Guard(Protocol):
    """What the slow path asks of a running guard (:class:`BlockingGuard`)."""

    _mode: str
    _scope: tuple[str, ...]
    _listeners: tuple[Callable[[BlockingCall], object], ...]

    def _allows(self, call: str, stack: _StackInfo) -> bool: ...

    def _in_scope(self, stack: _StackInfo) -> bool: ...

    def _admit(self, key: tuple[str, CodeType, int]) -> int | None: ...

    def _deliver(self, event: BlockingCall, *, to_sinks: bool) -> None: ...


class _Running:
    """The guards that run now, and the lock under which guards start, stop and patch.

    ``guards`` is a tuple, replaced whole under ``lock`` and read without it.
    """

    __slots__ = ("guards", "lock")

    def __init__(self) -> None:
        self.guards: tuple[_Guard, ...] = ()
        self.lock = threading.RLock()


_running = _Running()

# Blocking calls that ran and were reported (warn mode), newest last: (thread ident, end on the
# monotonic clock, seconds, catalogue name). The watchdog matches a stall to the call
# that caused it, so that one incident is reported once.
_recent: collections.deque[tuple[int, float, float, str]] = collections.deque(maxlen=32)
_failed_once = False


def _on_loop(
    entry: _Entry, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The slow path: the calling thread may be running an event loop."""
    __tracebackhide__ = True  # pytest: the failure is the caller's line, not ours
    state = _state
    if state.busy:  # inside a call already checked (or let through): not again
        return original(*args, **kwargs)
    probe = entry.probe
    if probe is not None:  # first: most calls asyncio makes itself end here
        # A call that does not block takes no lock that blocks either (a semaphore's
        # condition, a future's): neither the probe nor the call is checked inside.
        # Checking them refused a lock another thread held for a few instructions.
        state.busy = True
        try:
            try:
                seen = probe(original, args, kwargs)
            except Exception:
                seen = _RUN
            if seen is _RUN:
                return original(*args, **kwargs)
            if seen is not _BLOCKS:
                return seen  # done without blocking (an uncontended lock, a queued item)
        finally:
            state.busy = False
    if not _running.guards:
        return original(*args, **kwargs)
    state.busy = True  # whatever runs from here (probes, sinks, the call) is not checked
    try:
        try:
            verdict = _verdict(entry, original, args, kwargs)
        except BlockingCallError:
            raise
        except Exception:
            _internal_error()
            verdict = _RUN
        if verdict is _RUN:
            state.busy = False
            return original(*args, **kwargs)
        if verdict is _ALLOWED:
            return original(*args, **kwargs)
        start = _perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            took = _perf_counter() - start
            if any(action == "warn" for _, action, _ in verdict.plan):
                _recent.append((_get_ident(), _monotonic(), took, entry.name))
            verdict.deliver(took)
    finally:
        state.busy = False


def _internal_error() -> None:
    global _failed_once
    if not _failed_once:
        _failed_once = True
        logger.exception("loopguard blocking-call guard failed; the call was let through")


def _loop_kind() -> tuple[Any, str] | None:
    loop = _grl()
    if loop is not None:
        return loop, loop_kind(loop)
    if in_trio_task():
        return None, "trio"
    return None


def _verdict(
    entry: _Entry, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    __tracebackhide__ = True
    found = _loop_kind()
    if found is None:
        return _RUN
    frame: FrameType | None = sys._getframe(2)
    # Past the guard's own frames (generated replacements included) to the caller.
    while frame is not None and own_part(frame.f_code.co_filename) == "_blocking":
        frame = frame.f_back
    if frame is None:
        return _RUN
    if is_own(frame.f_code.co_filename):
        return _ALLOWED  # loopguard's own waits (stopping a sampler, writing a sink)
    stack_info = _StackInfo(frame)
    plan: list[tuple[_Guard, str, int | None]] = []
    key = (entry.name, frame.f_code, frame.f_lineno)
    strongest = ""
    for guard in _running.guards:
        action = guard._mode
        if action == "off" or guard._allows(entry.name, stack_info):
            continue
        if guard._scope and not guard._in_scope(stack_info):
            action = "record"  # outside the code under check: known, not refused
        if _STRENGTH[action] > _STRENGTH.get(strongest, 0):
            strongest = action
        admitted = guard._admit(key)
        if admitted is None and not guard._listeners and action != "raise":
            continue  # rate-limited and nobody needs the details
        plan.append((guard, action, admitted))
    if strongest:
        metrics.record(
            metrics.ASYNCIO_BLOCKING_CALLS,
            1,
            {metrics.BLOCKING_CALL_FUNCTION: entry.name, metrics.BLOCKING_CALL_ACTION: strongest},
        )
    if not plan:
        return _ALLOWED
    loop, kind = found
    stack = capture(frame)
    report = _Report(
        entry.name,
        stack,
        culprit_of(callback_frames(stack)) or (stack[-1] if stack else None),
        _task_name(loop, kind),
        threading.current_thread().name,
        kind,
        plan,
        current_attributes(),
    )
    if any(action == "raise" for _, action, _ in plan):
        event = report.deliver(0.0)
        raise BlockingCallError(event)
    return report


class _StackInfo:
    """The caller's frames as (module, qualname), read lazily and at most once."""

    __slots__ = ("_frame", "_rows")

    def __init__(self, frame: FrameType) -> None:
        self._frame = frame
        self._rows: list[tuple[str, str]] | None = None

    @property
    def first(self) -> tuple[str, str]:
        return _describe(self._frame)

    def rows(self) -> list[tuple[str, str]]:
        if self._rows is None:
            rows: list[tuple[str, str]] = []
            frame: FrameType | None = self._frame
            while frame is not None and len(rows) < 500:
                rows.append(_describe(frame))
                frame = frame.f_back
            self._rows = rows
        return self._rows


def _describe(frame: FrameType) -> tuple[str, str]:
    code = frame.f_code
    return (frame.f_globals.get("__name__") or "", getattr(code, "co_qualname", code.co_name))


def _task_name(loop: Any, kind: str) -> str | None:
    try:
        if kind == "trio":
            import trio

            return str(trio.lowlevel.current_task().name)
        task = asyncio.current_task(loop)
        return task.get_name() if task is not None else None
    except Exception:
        return None


class _Report:
    """A blocking call some guards want to hear about, delivered once it has run."""

    __slots__ = ("attributes", "culprit", "function", "loop", "plan", "stack", "task", "thread")

    def __init__(
        self,
        function: str,
        stack: tuple[Frame, ...],
        culprit: Frame | None,
        task: str | None,
        thread: str,
        loop: str,
        plan: list[tuple[_Guard, str, int | None]],
        attributes: dict[str, str],
    ) -> None:
        self.function = function
        self.stack = stack
        self.culprit = culprit
        self.task = task
        self.thread = thread
        self.loop = loop
        self.plan = plan
        self.attributes = attributes

    def deliver(self, duration: float) -> BlockingCall:
        """Hand one event per guard over; return the event of the first guard that raises."""
        first: BlockingCall | None = None
        for guard, action, admitted in self.plan:
            event = BlockingCall(
                function=self.function,
                duration=round(duration, 6),
                task=self.task,
                stack=self.stack,
                action=action,
                culprit=self.culprit,
                thread=self.thread,
                loop=self.loop,
                suppressed=admitted or 0,
                attributes=self.attributes,
            )
            if first is None or (action == "raise" and first.action != "raise"):
                first = event
            guard._deliver(event, to_sinks=admitted is not None)
        assert first is not None
        return first


def call_during(ident: int, start: float, end: float, share: float) -> str | None:
    """The reported blocking call that held thread ``ident`` for most of a stall.

    Args:
        ident: The loop thread.
        start: When the stall began (monotonic clock).
        end: When it ended.
        share: The part of the stall the call must cover.

    Returns:
        The call's catalogue name, or ``None`` when no reported call explains the stall.
    """
    for thread, ended, took, name in reversed(list(_recent)):
        if thread == ident and start <= ended <= end and took >= share * (end - start):
            return name
    return None
