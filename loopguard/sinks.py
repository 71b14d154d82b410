"""Where events go: the :class:`Sink` protocol and the sinks loopguard ships.

Sinks are called from loopguard's own sampler thread, never from the watched loop.
A sink that raises is disabled and the failure logged once (see :class:`SinkSet`);
the watched program never sees the exception.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from .events import Event, Frame, Stall

__all__ = [
    "CallbackSink",
    "JsonLinesSink",
    "LoggingSink",
    "RecordingSink",
    "Sink",
    "format_stall",
]

logger = logging.getLogger("loopguard")


@runtime_checkable
class Sink(Protocol):
    """Receives events. ``emit`` must not block for long; ``close`` is optional."""

    def emit(self, event: Event) -> None:
        """Handle one event."""


def format_stall(stall: Stall, *, max_frames: int = 12) -> str:
    """Render a stall for humans: the culprit first, then the most sampled stack.

    Args:
        stall: The stall to describe.
        max_frames: How many innermost frames of the stack to show.

    Returns:
        A multi-line string without a trailing newline.
    """
    where = str(stall.culprit) if stall.culprit else "no sample taken while it was held"
    task = f" in task {stall.task!r}" if stall.task else ""
    head = (
        f"event loop blocked for {stall.duration * 1000:.0f} ms{task} "
        f"[{stall.cause}, {stall.loop}, thread {stall.thread!r}]: {where}"
    )
    lines = [head]
    if stall.stacks:
        top = stall.stacks[0]
        lines.append(f"  stack ({top.count} of {stall.samples} samples), innermost last:")
        frames = top.frames[-max_frames:]
        if len(top.frames) > len(frames):
            lines.append(f"    ... {len(top.frames) - len(frames)} outer frames")
        lines.extend(f"    {_frame_line(f, f == stall.culprit)}" for f in frames)
    return "\n".join(lines)


def _frame_line(frame: Frame, is_culprit: bool) -> str:
    return f"{frame}{'   <-- culprit' if is_culprit else ''}"


class LoggingSink:
    """Logs one WARNING per stall; repeats of a culprit are rate-limited.

    The first stall of a culprit is logged in full. Further stalls of the same
    culprit within ``window`` seconds are counted, not logged, and the next log line
    for that culprit says how many were folded into it. At most ``max_culprits``
    culprits are tracked (least recently seen forgotten first), so memory is bounded.

    Args:
        logger: The logger to write to (default ``logging.getLogger("loopguard")``).
        window: Seconds during which a culprit is logged at most once.
        max_culprits: Culprits remembered for rate limiting.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        window: float = 60.0,
        max_culprits: int = 1000,
    ) -> None:
        self.logger = logger or logging.getLogger("loopguard")
        self.window = window
        self.max_culprits = max_culprits
        # culprit key -> [last logged (monotonic), suppressed count, suppressed seconds]
        self._seen: collections.OrderedDict[object, list[float]] = collections.OrderedDict()

    def emit(self, event: Event) -> None:
        """Log a stall (other events are logged as their JSON form)."""
        if not isinstance(event, Stall):
            self.logger.warning("%s", json.dumps(event.to_dict()))
            return
        key = (event.culprit.file, event.culprit.line) if event.culprit else None
        now = time.monotonic()
        state = self._seen.get(key)
        if state is not None and now - state[0] < self.window:
            state[1] += 1
            state[2] += event.duration
            self._seen.move_to_end(key)
            return
        suffix = ""
        if state is not None and state[1]:
            suffix = f"\n  (+{int(state[1])} earlier stalls here not logged, {state[2]:.2f} s)"
        self._seen[key] = [now, 0, 0.0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_culprits:
            self._seen.popitem(last=False)
        self.logger.warning("%s%s", format_stall(event), suffix)


class JsonLinesSink:
    """Appends one JSON object per event per line to a file.

    The file is opened when the sink is created, so a path that cannot be written
    fails at install time with :class:`OSError`, never later. Each line is written
    with a single ``write`` in append mode, so several processes may share a file.

    Args:
        path: File to append to (created if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        """Write the event as one line."""
        line = json.dumps(event.to_dict(), separators=(",", ":")) + "\n"
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
                try:
                    logger.exception("loopguard sink %r raised; it is disabled", sink)
                except Exception:  # noqa: S110 - logging itself failed; nothing left to tell
                    pass

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
