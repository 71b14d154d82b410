"""Where events go: the :class:`Sink` protocol and the sinks loopguard ships.

Sinks are called from loopguard's own sampler thread, never from the watched loop.
A sink that raises is disabled and the failure logged once (see :class:`SinkSet`);
the watched program never sees the exception.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from ._core.frames import USER, classify, display_path, own_part
from ._core.frames import where as _where
from .events import BlockingCall, Event, Frame, Stall

__all__ = [
    "CallbackSink",
    "JsonLinesSink",
    "LoggingSink",
    "RecordingSink",
    "Sink",
    "format_blocking_call",
    "format_stall",
]

logger = logging.getLogger("loopguard")


@runtime_checkable
class Sink(Protocol):
    """Receives events. ``emit`` must not block for long; ``close`` is optional."""

    def emit(self, event: Event) -> None:
        """Handle one event."""


MAX_FRAMES = 12
"""Lines of a stack shown at most in a report (the culprit's line is always among them)."""


def format_stall(stall: Stall, *, max_frames: int = MAX_FRAMES, full_stacks: bool = False) -> str:
    """Render a stall for humans: the culprit first, then the most sampled stack.

    The culprit's frame is always shown, however deep the stack. Around it, frames of
    the user's code are shown; runs of other frames (the event loop, the standard
    library, installed packages, loopguard) are folded into one line that names their
    packages, except the call the culprit made and the innermost frame. Paths are
    shortened (see :func:`loopguard._core.frames.display_path`).

    Args:
        stall: The stall to describe.
        max_frames: How many lines of the stack to show at most (the culprit's is
            kept whatever this says).
        full_stacks: Show every frame, unfolded and uncapped.

    Returns:
        A multi-line string without a trailing newline.
    """
    if stall.culprit is not None:
        where = _where(stall.culprit)
    elif stall.cause == "gc":
        where = "garbage collection (no line to blame)"
    elif stall.samples or stall.stacks:
        where = "culprit not identified (see the stack)"
    else:
        where = "no sample taken while it was held"
    task = f" in task {stall.task!r}" if stall.task else ""
    why = {
        "c-held-gil": " by C code holding the GIL",
        "gil": f" waiting for the GIL held by thread {stall.hog.thread!r}" if stall.hog else "",
        "gc": _gc_text(stall),
    }.get(stall.cause, "")
    if stall.blocking_call:
        why = f" in blocking call {stall.blocking_call}()"
    head = (
        f"event loop blocked for {stall.duration * 1000:.0f} ms{task}{why} "
        f"[{stall.cause}, {stall.loop}, thread {stall.thread!r}]: {where}"
    )
    lines = [head]
    if stall.hog is not None and stall.hog.frames:
        lines.append(f"  thread {stall.hog.thread!r}, innermost last:")
        lines.extend(
            f"    {text}"
            for text in stack_lines(stall.hog.frames, stall.culprit, max_frames, full_stacks)
        )
    elif stall.stacks:
        top = stall.stacks[0]
        seen = f"{top.count} of {stall.samples} samples" if stall.samples else "traceback dump"
        lines.append(f"  stack ({seen}), innermost last:")
        lines.extend(
            f"    {text}"
            for text in stack_lines(top.frames, stall.culprit, max_frames, full_stacks)
        )
    return "\n".join(lines)


def _gc_text(stall: Stall) -> str:
    gc = stall.gc
    if gc is None:
        return " by garbage collection"
    return (
        f" by garbage collection (generation {gc.generation}, {gc.collections} collection(s), "
        f"{gc.pause * 1000:.0f} ms, {gc.collected} object(s) collected)"
    )


def stack_lines(
    frames: tuple[Frame, ...],
    culprit: Frame | None,
    max_frames: int = MAX_FRAMES,
    full_stacks: bool = False,
) -> list[str]:
    """The lines that show a stack (innermost last) around its culprit.

    See :func:`format_stall` for what is shown and folded.
    """
    # The blocking-call guard's own frames under a call it checked say nothing.
    while len(frames) > 1 and own_part(frames[-1].file) in ("_blocking", "_core"):
        frames = frames[:-1]
    cut = frames.index(culprit) if culprit in frames else len(frames) - 1
    mark = "   <-- culprit" if culprit is not None else ""
    if full_stacks:
        return [_where(f) + (mark if i == cut else "") for i, f in enumerate(frames)]
    last = len(frames) - 1
    out: list[str] = []
    folded: list[Frame] = []
    culprit_line = 0
    for i, frame in enumerate(frames):
        shown = i == cut or (cut < i and i in (cut + 1, last)) or classify(frame.file) == USER
        if not shown:
            folded.append(frame)
            continue
        if folded:
            out.append(_folded(folded))
            folded = []
        if i == cut:
            culprit_line = len(out)
        out.append(_where(frame) + (mark if i == cut else ""))
    if folded:
        out.append(_folded(folded))
    return _capped(out, culprit_line, max(max_frames, 2))


def _folded(frames: list[Frame]) -> str:
    """One line standing for a run of frames that are not the user's: their packages."""
    names: list[str] = []
    for frame in frames:
        name = _package(frame.file)
        if name not in names:
            names.append(name)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"... {len(frames)} frame(s) in {shown}"


def _package(file: str) -> str:
    if own_part(file) is not None:
        return "loopguard"
    if file.startswith("<frozen "):
        return file[len("<frozen ") :].rstrip(">").split(".")[0]
    path = display_path(file)
    if os.path.isabs(path) or path.startswith("<"):
        return os.path.basename(path)
    top = path.split(os.sep, 1)[0]
    return top[:-3] if top.endswith(".py") else top


def _capped(lines: list[str], keep: int, limit: int) -> list[str]:
    """At most ``limit`` lines (and one saying how many are left out), ``lines[keep]`` kept.

    Lines are left out from the outermost end first, then just below the kept line.
    """
    if len(lines) <= limit:
        return lines
    extra = len(lines) - (limit - 1)  # one line says what was left out
    front = min(extra, keep)
    rest = lines[front:]
    keep -= front
    back = extra - front
    if back:
        rest = rest[: keep + 1] + rest[keep + 1 + back :]
        return [*rest[: keep + 1], f"... {extra} more line(s) of the stack", *rest[keep + 1 :]]
    return [f"... {extra} more line(s) of the stack", *rest]


class LoggingSink:
    """Logs one WARNING per stall; repeats of a culprit are shortened, then rate-limited.

    The first stall of a culprit in a ``window`` is logged in full (culprit, then the
    stack). The next ``repeats`` stalls of the same culprit in that window get one
    short line each; further ones are only counted, and the next line logged for that
    culprit says how many were left out. At most ``max_culprits`` culprits are
    remembered (least recently seen forgotten first), so memory is bounded.

    Args:
        logger: The logger to write to (default ``logging.getLogger("loopguard")``).
        window: Seconds over which a culprit's reports are limited.
        repeats: Short lines per culprit per window after the full report.
        max_culprits: Culprits remembered for rate limiting.
        full_stacks: Show every frame of a stack, unfolded and uncapped.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        window: float = 60.0,
        repeats: int = 3,
        max_culprits: int = 1000,
        full_stacks: bool = False,
    ) -> None:
        self.logger = logger or logging.getLogger("loopguard")
        self.full_stacks = full_stacks
        self.window = window
        self.repeats = repeats
        self.max_culprits = max_culprits
        self._seen: collections.OrderedDict[object, _Rate] = collections.OrderedDict()
        self._seen_calls: collections.OrderedDict[object, _Rate] = collections.OrderedDict()
        self._blocking_lock = threading.Lock()

    def emit(self, event: Event) -> None:
        """Log a stall (other events are logged as their JSON form)."""
        if isinstance(event, BlockingCall):
            self._emit_blocking(event)
            return
        if not isinstance(event, Stall):
            # Events that describe themselves are logged as prose, others as JSON.
            own_str = type(event).__str__ is not Event.__str__
            self.logger.warning("%s", event if own_str else json.dumps(event.to_dict()))
            return
        if event.blocking_call:
            return  # the guard logged the call that caused it, with its duration
        key: object = (event.culprit.file, event.culprit.line) if event.culprit else None
        if key is None:  # no line: tell stalls apart by what is known about them
            key = (event.cause, event.hog.thread if event.hog else None)
        now = time.monotonic()
        rate = self._seen.get(key)
        if rate is None or now - rate.since >= self.window:
            left_out = (
                f" (+{rate.dropped} more stalls here not logged)" if rate and rate.dropped else ""
            )
            rate = self._seen[key] = _Rate(now)
            self._seen.move_to_end(key)
            while len(self._seen) > self.max_culprits:
                self._seen.popitem(last=False)
            self.logger.warning("%s%s", format_stall(event, full_stacks=self.full_stacks), left_out)
            return
        self._seen.move_to_end(key)
        rate.count += 1
        if rate.count > self.repeats:
            rate.dropped += 1
            return
        where = _where(event.culprit) if event.culprit else "no sample taken"
        last = (
            " (further repeats in this window are counted, not logged)"
            if rate.count == self.repeats
            else ""
        )
        self.logger.warning(
            "event loop blocked for %.0f ms again: %s (repeat %d)%s",
            event.duration * 1000,
            where,
            rate.count,
            last,
        )

    def _emit_blocking(self, event: BlockingCall) -> None:
        """Log a blocking call: in full once per call site and window, then briefly."""
        if event.action == "record":
            return
        where = event.culprit or (event.stack[-1] if event.stack else None)
        key = (
            "blocking_call",
            event.function,
            where.file if where else "",
            where.line if where else 0,
        )
        now = time.monotonic()
        with self._blocking_lock:
            seen = self._seen_calls
            rate = seen.get(key)
            if rate is None or now - rate.since >= self.window:
                dropped = (rate.dropped if rate else 0) + event.suppressed
                seen[key] = _Rate(now)
                seen.move_to_end(key)
                while len(seen) > self.max_culprits:
                    seen.popitem(last=False)
                text = format_blocking_call(event, full_stacks=self.full_stacks)
                if dropped:
                    text += f"\n  (+{dropped} more calls here not logged)"
                self.logger.warning("%s", text)
                return
            seen.move_to_end(key)
            rate.count += 1
            rate.dropped += event.suppressed
            if rate.count > self.repeats:
                rate.dropped += 1
                return
            last = (
                " (further repeats in this window are counted, not logged)"
                if rate.count == self.repeats
                else ""
            )
            self.logger.warning(
                "blocking call %s() on the event loop again (%.1f ms): %s (repeat %d)%s",
                event.function,
                event.duration * 1000,
                _where(where) if where else "?",
                rate.count,
                last,
            )


def format_blocking_call(
    call: BlockingCall, *, max_frames: int = MAX_FRAMES, full_stacks: bool = False
) -> str:
    """Render a blocking call for humans: the call and its culprit, then the stack.

    The stack is shown as :func:`format_stall` shows one.

    Args:
        call: The event to describe.
        max_frames: How many lines of the stack to show at most.
        full_stacks: Show every frame, unfolded and uncapped.

    Returns:
        A multi-line string without a trailing newline.
    """
    where = call.culprit or (call.stack[-1] if call.stack else None)
    task = f" in task {call.task!r}" if call.task else ""
    took = (
        "refused before it ran" if call.action == "raise" else f"took {call.duration * 1000:.1f} ms"
    )
    head = (
        f"blocking call {call.function}() on the event loop{task} {took} "
        f"[{call.action}, {call.loop}, thread {call.thread!r}]: "
        f"{_where(where) if where else 'no stack'}"
    )
    lines = [head]
    if call.stack:
        lines.append("  stack, innermost last:")
        lines.extend(
            f"    {text}" for text in stack_lines(call.stack, where, max_frames, full_stacks)
        )
    return "\n".join(lines)


class _Rate:
    __slots__ = ("count", "dropped", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.count = 0
        self.dropped = 0


class JsonLinesSink:
    """Appends one JSON object per event per line to a file.

    Each object is the event's :meth:`~loopguard.events.Event.to_dict` plus the
    ``pid`` of the process that wrote it.

    The file is opened when the sink is created, so a path that cannot be written
    fails at install time with :class:`OSError`, never later. Each line is written
    with a single ``write`` in append mode, so several processes may share a file.

    Args:
        path: File to append to (created if missing).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        """Write the event as one line, with the writing process's ``pid``."""
        data = event.to_dict()
        data["pid"] = os.getpid()  # several worker processes may share one file
        line = json.dumps(data, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)

    def close(self) -> None:
        """Close the file; later events are ignored."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class CallbackSink:
    """Calls a function with each event (on loopguard's sampler thread).

    Args:
        callback: Called with each event. It must be quick and thread-safe; to act on
            the loop, hand the event over with ``loop.call_soon_threadsafe``.
    """

    def __init__(self, callback: Callable[[Event], object]) -> None:
        self.callback = callback

    def emit(self, event: Event) -> None:
        """Pass the event to the callback."""
        self.callback(event)


class RecordingSink:
    """Keeps the most recent events in memory, for tests and summaries.

    Args:
        maxlen: How many events to keep; older ones are dropped and counted in
            :attr:`dropped`.
    """

    def __init__(self, maxlen: int = 1000) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.dropped = 0

    def emit(self, event: Event) -> None:
        """Record the event."""
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self.dropped += 1
            self._events.append(event)

    @property
    def events(self) -> list[Event]:
        """A snapshot of the recorded events, oldest first."""
        with self._lock:
            return list(self._events)

    @property
    def stalls(self) -> list[Stall]:
        """A snapshot of the recorded stalls, oldest first."""
        return [e for e in self.events if isinstance(e, Stall)]

    @property
    def blocking_calls(self) -> list[BlockingCall]:
        """A snapshot of the recorded blocking calls, oldest first."""
        return [e for e in self.events if isinstance(e, BlockingCall)]

    def clear(self) -> None:
        """Forget every recorded event."""
        with self._lock:
            self._events.clear()
            self.dropped = 0

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)


class SinkSet:
    """Fans events out to sinks; a sink that raises is disabled and logged once."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = list(sinks)
        self.disabled: list[Sink] = []

    def emit(self, event: Event) -> None:
        """Send the event to every enabled sink."""
        for sink in list(self.sinks):
            try:
                sink.emit(event)
            except Exception:
                self.sinks.remove(sink)
                self.disabled.append(sink)
                with contextlib.suppress(Exception):
                    logger.exception("loopguard sink %r raised; it is disabled", sink)

    def close(self) -> None:
        """Close every sink that has a ``close`` method; errors are logged."""
        for sink in self.sinks + self.disabled:
            close = getattr(sink, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception:
                logger.exception("closing loopguard sink %r failed", sink)
