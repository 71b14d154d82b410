"""Reading the loop thread's stack from the sampler thread, and folding the samples.

Only file names, line numbers and function names are kept; frame objects are
dropped before a function returns, so no local variable outlives a sample.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter

from .._core.frames import callback_frames, capture, culprit_of, is_idle
from ..events import Frame, StackSample

__all__ = ["MAX_STACKS", "StackFolder", "sample_threads"]

#: Distinct stacks kept per stall; further distinct stacks are only counted.
MAX_STACKS = 32


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
