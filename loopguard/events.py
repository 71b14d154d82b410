"""Events loopguard reports: frozen, JSON-serialisable dataclasses.

Every event has a ``kind`` (the ``"kind"`` field of its JSON form) and a
:meth:`to_dict` that returns plain JSON types. Events never hold frame objects or
local variables: a stack is a tuple of :class:`Frame` (file, line, function).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "BlockingCall",
    "ConnectionClosed",
    "Event",
    "Frame",
    "GcPause",
    "Hog",
    "Offloaded",
    "SlowCallback",
    "StackSample",
    "Stall",
]


def short_path(path: str) -> str:
    """``path`` relative to the current directory when it is under it, else as given."""
    here = os.getcwd() + os.sep
    return path[len(here) :] if path.startswith(here) else path


@dataclass(frozen=True)
class Frame:
    """One frame of a stack, reduced to where it points.

    Attributes:
        file: Path of the source file (as the code object names it).
        line: Line number being executed in that frame.
        function: Qualified function name where the interpreter provides one.
    """

    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"

    def to_dict(self) -> dict[str, Any]:
        """Return the frame as a JSON-ready mapping."""
        return {"file": self.file, "line": self.line, "function": self.function}


@dataclass(frozen=True)
class StackSample:
    """A distinct stack seen while the loop was held, with how often it was seen.

    Attributes:
        count: Number of samples that showed exactly this stack.
        frames: The frames, outermost first and innermost last.
    """

    count: int
    frames: tuple[Frame, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the sample as a JSON-ready mapping."""
        return {"count": self.count, "frames": [f.to_dict() for f in self.frames]}


@dataclass(frozen=True)
class Event:
    """Base class of every loopguard event."""

    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a JSON-ready mapping with a ``"kind"`` field first."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out


@dataclass(frozen=True)
class Stall(Event):
    """The event loop was held for at least the threshold.

    Attributes:
        started_at: Wall-clock time (epoch seconds) the stall began.
        duration: How long the loop could not run, in seconds, measured by the
            loop's own heartbeat.
        cause: Why the loop was held. ``"blocked"``: the loop thread ran Python
            code or waited in a call that releases the GIL (sleep, I/O, a lock);
            samples name the line. ``"c-held-gil"``: the loop thread ran C code that
            held the GIL (a catastrophic regex, a C extension); the line that called
            into C comes from a capture of the process read from outside it
            (py-spy, from a helper process). ``"gil"``: the
            loop was idle but could not run because another thread held the GIL;
            :attr:`hog` names that thread. ``"gc"``: the garbage collector ran for
            most of the stall (:attr:`gc` says which generation and how much it
            freed); the line that was running merely triggered it. ``"import"``:
            module-level code ran inside the running loop (an application imported
            by its server after the loop started); :attr:`culprit` is the module's
            line; summaries keep it apart from user stalls. ``"scheduler"``: the
            loop was idle and no thread held the GIL: the operating system did not
            run the process (a busy machine, a CPU quota, a paused process).
            ``"unknown"``: the loop was late but nothing could be observed.
        task: Name of the task that was running on the loop, when known.
        culprit: The deepest frame of user code in the most sampled stack: the
            line that held the loop. ``None`` when nothing was sampled.
        stacks: Distinct stacks sampled while the loop was held, most frequent
            first, each with its count.
        samples: Total number of samples taken during the stall.
        thread: Name of the thread that runs the loop.
        loop: Kind of loop: ``"asyncio"``, ``"uvloop"`` or ``"trio"``.
        attributes: Attribution read from the running task (for example a route).
        hog: For ``cause="gil"``: the thread that held the GIL, with its stack.
        loop_cpu: Share of the stall the loop thread spent on the CPU (0 to 1), when
            the platform has per-thread CPU clocks.
        gc: Garbage collections that ran during the stall (any cause), if any.
        blocking_call: The catalogue name of the blocking call that held the loop
            for most of the stall, when the blocking-call guard reported that call
            (as a :class:`BlockingCall`): one incident, two views of it. Log output
            shows it once.
        tasks: Every task seen running on the loop during the stall, in the order
            seen (at most 8). When more than one ran, :attr:`task` is ``None``: no
            single task held the loop.
        capture_error: Why the line is missing, for a stall whose cause needed a
            capture from outside the process (``c-held-gil``, ``gil``) that could not
            be read: py-spy not installed, the kernel refused the read, another OS,
            or the stall ended before a capture. ``None`` when nothing is missing.
    """

    kind: ClassVar[str] = "stall"

    started_at: float
    duration: float
    cause: str
    task: str | None
    culprit: Frame | None
    stacks: tuple[StackSample, ...] = ()
    samples: int = 0
    thread: str = ""
    loop: str = "asyncio"
    attributes: Mapping[str, str] = field(default_factory=dict)
    hog: Hog | None = None
    loop_cpu: float | None = None
    gc: GcPause | None = None
    blocking_call: str | None = None
    tasks: tuple[str, ...] = ()
    capture_error: str | None = None


@dataclass(frozen=True)
class Hog:
    """Another thread that held the GIL while the loop waited for it.

    Attributes:
        thread: The thread's name.
        frames: Its stack while it held the GIL, innermost last.
        cpu: CPU seconds it used over the stall, when known.
    """

    thread: str
    frames: tuple[Frame, ...]
    cpu: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the hog as a JSON-ready mapping."""
        return {
            "thread": self.thread,
            "frames": [f.to_dict() for f in self.frames],
            "cpu": self.cpu,
        }


@dataclass(frozen=True)
class GcPause:
    """Garbage collection that ran while the loop was held.

    Attributes:
        pause: Seconds spent collecting within the stall.
        collections: How many collections ran in it.
        generation: The oldest generation collected (2 is a full collection).
        collected: Unreachable objects the collections found.
    """

    pause: float
    collections: int
    generation: int
    collected: int

    def to_dict(self) -> dict[str, Any]:
        """Return the pause as a JSON-ready mapping."""
        return dataclasses.asdict(self)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Offloaded(Event):
    """An adaptive ``@offload`` function exceeded its budget inline and now runs offloaded.

    Emitted once per function, when a call that ran on the event loop took longer
    than the function's budget; from then on every call goes to a worker.

    Attributes:
        function: Qualified name of the function (``module.qualname``).
        duration: How long the call that exceeded the budget held the loop, in seconds.
        budget: The function's inline budget, in seconds.
        mode: Where its calls go from now on: ``"thread"``, ``"process"`` or
            ``"executor"``.
        definition: Where the function is defined (its first line), when known.
        task: Name of the task that made the call, when known.
    """

    kind: ClassVar[str] = "offloaded"

    function: str
    duration: float
    budget: float
    mode: str
    definition: Frame | None = None
    task: str | None = None

    def __str__(self) -> str:
        where = f" ({self.definition.file}:{self.definition.line})" if self.definition else ""
        target = {"thread": "a worker thread", "process": "a worker process"}.get(
            self.mode, "its executor"
        )
        return (
            f"{self.function}{where} held the event loop for {self.duration * 1000:.1f} ms, "
            f"over its inline budget of {self.budget * 1000:.1f} ms; "
            f"its calls run in {target} from now on"
        )


@dataclass(frozen=True)
class BlockingCall(Event):
    """A call that blocks (sleep, file or network I/O, a lock wait) made on a loop thread.

    Reported by the blocking-call guard (``install(blocking=...)``, the pytest
    plugin, :class:`~loopguard.BlockingGuard`) for calls made on a thread that is
    running an event loop, never for calls made in worker threads.

    Attributes:
        function: Catalogue name of the call, for example ``"time.sleep"`` or
            ``"socket.socket.recv"``.
        duration: Seconds the call took (``0.0`` when the call was refused with
            :class:`~loopguard.BlockingCallError` before it ran).
        task: Name of the task that made the call, when known.
        stack: The caller's stack, outermost first and innermost last (the frame
            that made the call is last; loopguard's own frames are left out).
        action: What the guard did: ``"warn"`` (logged), ``"raise"`` (refused the
            call) or ``"record"`` (event only).
        culprit: The frame to blame: the deepest frame of user code in ``stack``
            (library code when no user frame is there).
        thread: Name of the loop thread.
        loop: Kind of loop: ``"asyncio"``, ``"uvloop"`` or ``"trio"``.
        suppressed: Calls from the same line not reported as events since the
            previous event from it (per-site rate limit; ``0`` when none).
        attributes: Values of the context variables registered with
            :func:`loopguard.attribute`, read in the task that made the call.
    """

    kind: ClassVar[str] = "blocking_call"

    function: str
    duration: float
    task: str | None
    stack: tuple[Frame, ...]
    action: str
    culprit: Frame | None = None
    thread: str = ""
    loop: str = "asyncio"
    suppressed: int = 0
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SlowCallback(Event):
    """A callback ran longer than ``slow_callback`` but shorter than the stall threshold.

    Reported only in precise mode (``install(precise=True)``), which times every
    callback on pure-Python asyncio loops. Callbacks that reach the threshold are
    reported once, as a :class:`Stall` with sampled stacks, never also as this.

    Attributes:
        duration: How long the callback ran, in seconds.
        callback: What ran: the coroutine's qualified name for a task step, else the
            callback's qualified name.
        task: Name of the task whose step it was, if any.
        culprit: The function that ran (its file and first line): a callback this
            short is not sampled, so the exact line is not known.
        thread: Name of the loop thread.
    """

    kind: ClassVar[str] = "slow_callback"

    duration: float
    callback: str
    task: str | None
    culprit: Frame | None
    thread: str = ""

    def __str__(self) -> str:
        task = f" in task {self.task!r}" if self.task else ""
        where = f" ({short_path(self.culprit.file)}:{self.culprit.line})" if self.culprit else ""
        return f"slow callback: {self.callback}{where} ran {self.duration * 1000:.0f} ms{task}"


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """A guarded WebSocket connection was closed for a reason worth explaining.

    Reported by ``loopguard_integrations`` (``guard_receive``) when a connection ends
    by keepalive timeout (1011), by its overflow policy (1013), by a message over
    ``max_bytes`` (1009) or by its idle timeout; never for an ordinary close by the
    peer. It says what the receive queue looked like at that moment and, when the
    event loop was stalled during the last ping window, which line held it: a
    keepalive close is often the loop's fault, not the network's.

    Attributes:
        code: The WebSocket close code (1011, 1013, 1009, or the idle timeout's 1000).
        reason: Why: ``"keepalive"`` (no pong in time), ``"overflow"`` (queue full
            under ``overflow="close"``), ``"too_large"`` (a message over
            ``max_bytes``) or ``"idle"`` (no message for ``idle_timeout`` seconds).
        route: The route template of the connection, when known.
        depth: Messages in the receive queue when it closed.
        maxsize: The queue's capacity in messages.
        full_since: Wall-clock time (epoch seconds) since which the queue had been
            full, or ``None`` when it was not full.
        delivered: Messages handed to the consumer so far.
        dropped: Messages dropped so far (every reason).
        lag: Age of the oldest queued message, in seconds (0 when empty).
        ping_rtt: The last measured ping round trip, in seconds, when known.
        stall: The longest stall of the event loop during the last ping window (or
            the last ``window`` seconds), if any: its culprit line.
        stall_duration: That stall's duration in seconds.
    """

    kind: ClassVar[str] = "connection_closed"

    code: int
    reason: str
    route: str | None = None
    depth: int = 0
    maxsize: int = 0
    full_since: float | None = None
    delivered: int = 0
    dropped: int = 0
    lag: float = 0.0
    ping_rtt: float | None = None
    stall: Frame | None = None
    stall_duration: float | None = None

    def __str__(self) -> str:
        why = {
            "keepalive": "no pong within the keepalive timeout",
            "overflow": "receive queue full (overflow='close')",
            "too_large": "a message over max_bytes",
            "idle": "no message within the idle timeout",
        }.get(self.reason, self.reason)
        route = f" on {self.route}" if self.route else ""
        full = ""
        if self.full_since is not None:
            full = f", full for {max(0.0, time.time() - self.full_since):.1f} s"
        text = (
            f"WebSocket{route} closed with {self.code} ({why}): queue {self.depth}/{self.maxsize}"
            f"{full}, oldest waiting {self.lag * 1000:.0f} ms, {self.delivered} delivered, "
            f"{self.dropped} dropped"
        )
        if self.ping_rtt is not None:
            text += f", last ping {self.ping_rtt * 1000:.1f} ms"
        if self.stall is not None:
            took = f" for {self.stall_duration * 1000:.0f} ms" if self.stall_duration else ""
            text += (
                f"; the event loop was blocked{took} by "
                f"{short_path(self.stall.file)}:{self.stall.line} in {self.stall.function}"
            )
        return text
