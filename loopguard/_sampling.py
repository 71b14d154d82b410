"""Reading a thread's stack from another thread, folding samples, naming the culprit.

This module owns the rule for "user code": a frame is *plumbing* when it belongs to
loopguard itself, to the standard library, or to an event-loop framework (asyncio,
uvloop, anyio, trio, sniffio). A frame in another installed package is *library*
code; anything else is the user's. The culprit of a stall is the deepest user frame
of the most sampled stack, else the deepest library frame, else the deepest frame.

Only file names, line numbers and function names are kept; frame objects are
dropped before a function returns, so no local variable outlives a sample.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import threading
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from types import FrameType

from .events import Frame, StackSample

__all__ = [
    "MAX_DEPTH",
    "MAX_STACKS",
    "StackFolder",
    "callback_frames",
    "capture",
    "culprit_of",
    "is_idle",
]

#: Frames kept per sample (the innermost ones: that is where the culprit is).
MAX_DEPTH = 64
#: Distinct stacks kept per stall; further distinct stacks are only counted.
MAX_STACKS = 32

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Modules of loopguard that are applications, not plumbing: their frames may be culprits.
_APP_MODULES = frozenset({os.path.join(_PACKAGE_DIR, "_demo.py")})
_LOOP_PACKAGES = ("asyncio", "uvloop", "anyio", "trio", "sniffio", "_pytest", "pluggy")


def _prefixes(*keys: str) -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    seen = {os.path.abspath(paths[k]) + os.sep for k in keys if k in paths}
    return tuple(sorted(seen, key=len, reverse=True))


_STDLIB = _prefixes("stdlib", "platstdlib")
_SITE = _prefixes("purelib", "platlib")

PLUMBING, LIBRARY, USER = 0, 1, 2


@lru_cache(maxsize=4096)
def classify(filename: str) -> int:
    """Return ``PLUMBING``, ``LIBRARY`` or ``USER`` for a code object's file name."""
    if filename.startswith("<"):
        return PLUMBING if filename.startswith("<frozen") else USER
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR):
        return USER if path in _APP_MODULES else PLUMBING
    site = next((p for p in _SITE if path.startswith(p)), None)
    if site is None and "site-packages" + os.sep in path:
        site = path[: path.index("site-packages" + os.sep) + len("site-packages" + os.sep)]
    if site is not None:
        top = path[len(site) :].split(os.sep, 1)[0]
        return PLUMBING if top in _LOOP_PACKAGES else LIBRARY
    if any(path.startswith(p) for p in _STDLIB):
        return PLUMBING
    return USER


def _function_name(frame: FrameType) -> str:
    code = frame.f_code
    return getattr(code, "co_qualname", code.co_name)


def capture(frame: FrameType | None, max_depth: int = MAX_DEPTH) -> tuple[Frame, ...]:
    """Reduce a live frame chain to a stack of :class:`Frame`, outermost first.

    Args:
        frame: The innermost frame (e.g. from ``sys._current_frames()``).
        max_depth: How many of the innermost frames to keep.

    Returns:
        The frames, innermost last. No frame object is retained.
    """
    out: list[Frame] = []
    while frame is not None and len(out) < max_depth:
        out.append(Frame(frame.f_code.co_filename, frame.f_lineno or 0, _function_name(frame)))
        frame = frame.f_back
    out.reverse()
    return tuple(out)


def sample_threads(
    thread_id: int, others_if_idle: bool = True
) -> tuple[tuple[Frame, ...], dict[int, tuple[Frame, ...]] | None]:
    """Sample another thread's stack; if it is idle, also every other thread's.

    Returns:
        The thread's stack (empty if it is gone) and, when that stack shows an idle
        loop and ``others_if_idle`` is set, the stacks of all other threads.
    """
    frames = sys._current_frames()
    try:
        stack = capture(frames.get(thread_id))
        others = None
        if others_if_idle and is_idle(stack):
            me = threading.get_ident()
            others = {i: capture(f) for i, f in frames.items() if i not in (thread_id, me)}
        return stack, others
    finally:
        del frames


_WATCHDOG_FILE = os.path.join(_PACKAGE_DIR, "_watchdog.py")


def _is_dispatch(frame: Frame) -> bool:
    # The frame below which the loop runs callbacks: loopguard's run_forever wrapper
    # (asyncio, uvloop) or trio's run loop.
    if frame.function == "_run_forever":
        return os.path.abspath(frame.file) == _WATCHDOG_FILE
    return frame.function == "unrolled_run" and frame.file.endswith(
        os.path.join("trio", "_core", "_run.py")
    )


def callback_frames(stack: tuple[Frame, ...]) -> tuple[Frame, ...]:
    """Return the part of a loop thread's stack run by the loop (below its dispatch).

    Frames above the dispatch (``asyncio.run(main())`` and its callers) never
    explain a stall. When no dispatch frame is found the whole stack is returned.
    """
    for i in range(len(stack) - 1, -1, -1):
        if _is_dispatch(stack[i]):
            return stack[i + 1 :]
    return stack


_WAITS = frozenset({"select", "poll", "control", "get_events", "_run_once", "run_forever"})


def is_idle(stack: tuple[Frame, ...]) -> bool:
    """True when the loop thread's stack shows no user or library code in a callback.

    That is a loop waiting in ``select()`` (or for the GIL to come back from it).
    """
    if not stack:
        return True
    if any(_is_dispatch(f) for f in stack):
        return all(classify(f.file) == PLUMBING for f in callback_frames(stack))
    inner = stack[-1]
    return classify(inner.file) == PLUMBING and inner.function.rsplit(".", 1)[-1] in _WAITS


def culprit_of(stack: Iterable[Frame]) -> Frame | None:
    """Return the frame to blame in a stack (innermost last), per the module rule."""
    best: Frame | None = None
    best_rank = -1
    for frame in stack:
        rank = classify(frame.file)
        if rank >= best_rank:
            best, best_rank = frame, rank
    return best


class StackFolder:
    """Counts identical stacks, keeping at most :data:`MAX_STACKS` distinct ones."""

    __slots__ = ("_counts", "overflow", "total")

    def __init__(self) -> None:
        self._counts: Counter[tuple[Frame, ...]] = Counter()
        self.total = 0
        self.overflow = 0

    def add(self, stack: tuple[Frame, ...]) -> None:
        """Count one sample."""
        self.total += 1
        if stack in self._counts or len(self._counts) < MAX_STACKS:
            self._counts[stack] += 1
        else:
            self.overflow += 1

    def folded(self) -> tuple[StackSample, ...]:
        """Return the distinct stacks, most frequent first."""
        return tuple(StackSample(n, s) for s, n in self._counts.most_common())

    def culprit(self) -> Frame | None:
        """Return the culprit of the most sampled stack, if any was sampled."""
        if not self._counts:
            return None
        ((stack, _),) = self._counts.most_common(1)
        return culprit_of(callback_frames(stack)) or culprit_of(stack)

    def top(self) -> tuple[Frame, ...]:
        """The most sampled stack (empty if nothing was sampled)."""
        return self._counts.most_common(1)[0][0] if self._counts else ()
