"""Events loopguard reports: frozen, JSON-serialisable dataclasses.

Every event has a ``kind`` (the ``"kind"`` field of its JSON form) and a
:meth:`to_dict` that returns plain JSON types. Events never hold frame objects or
local variables: a stack is a tuple of :class:`Frame` (file, line, function).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "BlockingCall",
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
            into C comes from a traceback dump that needs no GIL. ``"gil"``: the
            loop was idle but could not run because another thread held the GIL;
            :attr:`hog` names that thread. ``"gc"``: the garbage collector ran for
            most of the stall (:attr:`gc` says which generation and how much it
            freed); the line that was running merely triggered it. ``"unknown"``:
            the loop was late but nothing could be observed.
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
