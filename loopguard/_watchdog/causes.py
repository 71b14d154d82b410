"""Telling stall causes apart: thread CPU clocks, samples, and a capture from outside.

The evidence, from the cheapest to the most direct:

* :class:`CpuClocks` reads each Python thread's CPU clock
  (``time.pthread_getcpuclockid``). Comparing two readings says whether the loop
  thread was computing (CPU ≈ wall time) or waiting, and which other thread burned
  the CPU meanwhile (the GIL hog).
* Samples of the loop thread's stack (:mod:`.sampling`), and how long the sampler
  itself went without running (``max_gap``): one gap covering most of a stall means
  the sampler could not get the GIL; many short late wakes mean the operating system
  kept it off a CPU, and the samples it did take still tell what the loop ran.
* A capture (:class:`~.capture.Dump`) read from outside the process while the
  sampler was starved: every thread's stack and which thread held the GIL.

:func:`diagnose` is the decision table of ``docs/explanation/causes.md``.
"""

from __future__ import annotations

import logging
import threading
import time

from .._core.frames import PLUMBING, callback_frames, classify, culprit_of, is_idle
from ..events import Frame, Hog, StackSample
from .capture import Dump
from .sampling import StackFolder

__all__ = [
    "CpuClocks",
    "CpuSnapshot",
    "Diagnosis",
    "diagnose",
    "is_import",
]

logger = logging.getLogger("loopguard")

_HAS_CPU_CLOCKS = hasattr(time, "pthread_getcpuclockid")


class CpuSnapshot:
    """CPU seconds per thread ident at one moment (monotonic ``at``)."""

    __slots__ = ("at", "cpu", "names")

    def __init__(self, at: float, cpu: dict[int, float], names: dict[int, str]) -> None:
        self.at = at
        self.cpu = cpu
        self.names = names


class CpuClocks:
    """Reads the CPU clock of every live Python thread."""

    available = _HAS_CPU_CLOCKS

    def snapshot(self) -> CpuSnapshot | None:
        """Return the CPU time of each thread now, or ``None`` where unsupported."""
        if not _HAS_CPU_CLOCKS:
            return None
        cpu: dict[int, float] = {}
        names: dict[int, str] = {}
        for thread in threading.enumerate():
            ident = thread.ident
            if ident is None:
                continue
            try:
                cpu[ident] = time.clock_gettime(time.pthread_getcpuclockid(ident))
            except (OSError, OverflowError):  # the thread just ended
                continue
            names[ident] = thread.name
        return CpuSnapshot(time.monotonic(), cpu, names)


class Diagnosis:
    """What the evidence says about one stall (see :func:`diagnose`)."""

    __slots__ = ("cause", "culprit", "hog", "loop_cpu", "stacks")

    def __init__(
        self,
        cause: str,
        culprit: Frame | None,
        stacks: tuple[StackSample, ...],
        hog: Hog | None = None,
        loop_cpu: float | None = None,
    ) -> None:
        self.cause = cause
        self.culprit = culprit
        self.stacks = stacks
        self.hog = hog
        self.loop_cpu = loop_cpu


_THREAD_WAITS = frozenset(
    {
        "wait",
        "select",
        "poll",
        "get",
        "acquire",
        "join",
        "control",
        "get_events",
        "accept",
        "recv",
        "_wait_for_tstate_lock",
        "_worker",
        "sleep",
    }
)


def _waiting(frames: tuple[Frame, ...]) -> bool:
    inner = frames[-1]
    return classify(inner.file) == PLUMBING and inner.function.rsplit(".", 1)[-1] in _THREAD_WAITS


# A thread that used less CPU than this share of a stall cannot have held the GIL for it.
_MIN_HOG_SHARE = 0.1


def _gone(
    before: CpuSnapshot | None, after: CpuSnapshot | None, exclude: frozenset[int]
) -> list[int]:
    """Threads alive at the reading before a stall and gone at the one after it."""
    if before is None or after is None:
        return []
    return [i for i in before.cpu if i not in after.cpu and i not in exclude]


def _cpu_deltas(before: CpuSnapshot | None, after: CpuSnapshot | None) -> dict[int, float]:
    if before is None or after is None:
        return {}
    return {i: after.cpu[i] - before.cpu[i] for i in after.cpu if i in before.cpu}


def is_import(stack: tuple[Frame, ...]) -> bool:
    """True when ``stack`` runs an import (a module's top-level code) inside a callback.

    Servers such as uvicorn import the application after their loop started, so its
    module-level code, and any import a handler makes the first time, holds the loop:
    a start-up stall, not a request's.
    """
    frames = callback_frames(stack) or stack
    return any(f.file.startswith("<frozen importlib") for f in frames)


def _hog(
    ident: int,
    frames: tuple[Frame, ...],
    name: str | None,
    deltas: dict[int, float],
) -> tuple[Hog, Frame | None]:
    hog = Hog(name or hex(ident), frames, round(deltas[ident], 4) if ident in deltas else None)
    return hog, culprit_of(frames)


# A sampler gap this share of a stall long means the sampler could not get the GIL.
_STARVED_SHARE = 0.5
# A loop thread that waited for a CPU this share of a stall, and computed too little
# to hold the loop by itself (``little_work``), was held by the operating system.
_QUEUED_SHARE = 0.75


# diagnose() is longer than the other functions on purpose: it is the decision table of
# docs/explanation/causes.md, read top to bottom in the order the rules apply; split
# into helpers, the order of the rules would no longer be visible in one place.
def diagnose(
    *,
    loop_ident: int,
    duration: float,
    folder: StackFolder | None,
    before: CpuSnapshot | None,
    after: CpuSnapshot | None,
    dump: Dump | None,
    others: dict[int, tuple[Frame, ...]] | None,
    exclude: frozenset[int] = frozenset(),
    max_gap: float = 0.0,
    after_gap: int = 0,
    queued: float | None = None,
    little_work: float = 0.0,
) -> Diagnosis:
    """Decide a stall's cause and culprit from samples, CPU clocks and a capture.

    * A capture that saw the loop thread hold the GIL outside the event loop's
      ``select()``, while the sampler was shut out for most of the stall (or took no
      sample in a callback): ``c-held-gil``; culprit from the capture. If the
      sampler did get in between (mixed C and Python work): ``blocked``, from samples.
    * A capture that saw another thread hold the GIL, the same way: ``gil``; the hog
      and its line from the capture (also for a thread that has exited since).
    * Samples that show the loop in a callback: ``blocked``; culprit from samples. But
      if the loop thread computed little and waited for a CPU most of the stall:
      ``scheduler`` (the line is kept: where the operating system stopped it).
    * Samples that show the loop idle in ``select()``: ``gil`` if another thread
      burned CPU (the hog, its stack from the last sample of all threads when one was
      taken); else ``scheduler``: no thread held the GIL, the operating system did
      not run the loop's thread.
    * No usable samples and no capture: the CPU clocks tell ``c-held-gil`` (loop
      thread on a CPU) from ``gil`` (another thread busiest); culprit unknown.
    * Nothing observed: ``unknown``.

    Args:
        loop_ident: ``threading.get_ident()`` of the loop thread.
        duration: Length of the stall in seconds.
        folder: Samples of the loop thread taken during the stall, if any.
        before: CPU clocks read before the stall, if available.
        after: CPU clocks read after it, if available.
        dump: A capture taken while the sampler was starved during the stall.
        others: Stacks of the other threads at the last sample, if any.
        exclude: Thread idents never to blame (loopguard's own threads).
        max_gap: The longest time the sampler went without running during the stall
            while the loop thread used the CPU (it held the GIL).
        after_gap: How many samples were taken right after such a gap.
        queued: Share of the stall the loop thread spent runnable but waiting for a
            CPU (Linux), when known.
        little_work: CPU seconds of the loop thread below which a stall it mostly
            spent waiting for a CPU is the scheduler's: that work alone holds no loop.

    Returns:
        The diagnosis.
    """
    deltas = _cpu_deltas(before, after)
    loop_cpu = None
    if loop_ident in deltas and duration > 0:
        loop_cpu = round(min(1.0, max(0.0, deltas[loop_ident] / duration)), 3)
    sampled = folder is not None and folder.total > 0
    top = folder.top() if folder is not None and sampled else ()
    in_callback = sampled and not is_idle(top)
    # The sampler was shut out by the loop thread: for most of the stall, or it got in
    # only once, at the end (a single C call ending, not C calls between Python work).
    lone = folder is not None and folder.total == 1 and after_gap == 1
    starved = max_gap >= _STARVED_SHARE * duration or lone
    shut_out = starved or not in_callback
    stacks = folder.folded() if folder is not None and sampled else ()

    # 1. Direct evidence: who held the GIL while the sampler was shut out.
    if dump is not None and shut_out:
        holder = dump.gil if dump.gil not in exclude else None
        held = dump.stacks.get(loop_ident, ())
        # A loop thread that hardly ran held the GIL only because the OS had paused it.
        computed = deltas.get(loop_ident, little_work) >= little_work / 2
        if holder == loop_ident and held and not is_idle(held) and computed:
            culprit = culprit_of(callback_frames(held)) or culprit_of(held)
            return Diagnosis(
                "c-held-gil", culprit, stacks or (StackSample(1, held),), None, loop_cpu
            )
        if holder is not None and holder != loop_ident:
            hog, culprit = _hog(holder, dump.stacks.get(holder, ()), dump.names.get(holder), deltas)
            return Diagnosis("gil", culprit, stacks or (StackSample(1, held),), hog, loop_cpu)
        if holder is None and held and not is_idle(held) and not in_callback and computed:
            # The capture could not tell who held the GIL: the loop was not waiting
            # for events, and nothing ran Python meanwhile: it was in C.
            culprit = culprit_of(callback_frames(held)) or culprit_of(held)
            return Diagnosis("c-held-gil", culprit, (StackSample(1, held),), None, loop_cpu)

    # 2. Samples of the loop thread, unless the sampler was shut out for most of the stall
    #    (then they show where the loop went next, not what held it: back in select()
    #    after a C call, or in the next callback).
    if sampled and not starved:
        if in_callback:
            culprit = culprit_of(callback_frames(top)) or culprit_of(top)
            if (
                queued is not None
                and queued >= _QUEUED_SHARE
                and deltas.get(loop_ident, little_work) < little_work
            ):
                # Little work, and the loop thread waited for a CPU most of the stall:
                # with a free core there would have been no stall. The line is kept.
                return Diagnosis("scheduler", culprit, stacks, None, loop_cpu)
            return Diagnosis("blocked", culprit, stacks, None, loop_cpu)
        return _waiting_loop(
            loop_ident, duration, stacks, before, after, deltas, others, exclude, loop_cpu
        )

    # 3. No usable stack: the CPU clocks still tell the two GIL causes apart. On a
    #    machine short of cores the loop thread may get well under one CPU while it
    #    holds the GIL, so "busiest thread of the process" counts as well.
    if loop_cpu is None:
        return Diagnosis("unknown", None, stacks, None, loop_cpu)
    candidates = {i: d for i, d in deltas.items() if i not in exclude}
    busiest = max(candidates, key=candidates.__getitem__) if candidates else None
    if loop_cpu >= 0.5 or (busiest == loop_ident and loop_cpu >= 0.1):
        return Diagnosis("c-held-gil", None, stacks, None, loop_cpu)
    if (
        busiest is not None
        and busiest != loop_ident
        and candidates[busiest] >= _MIN_HOG_SHARE * duration
    ):
        label = (after.names.get(busiest) if after else None) or hex(busiest)
        return Diagnosis(
            "gil", None, stacks, Hog(label, (), round(candidates[busiest], 4)), loop_cpu
        )
    # The hog may have exited during the stall: its clock is gone, its name is not.
    gone = _gone(before, after, exclude | {loop_ident})
    if gone and before is not None:
        return Diagnosis(
            "gil", None, stacks, Hog(before.names.get(gone[0], hex(gone[0])), ()), loop_cpu
        )
    return Diagnosis("unknown", None, stacks, None, loop_cpu)


def _waiting_loop(
    loop_ident: int,
    duration: float,
    stacks: tuple[StackSample, ...],
    before: CpuSnapshot | None,
    after: CpuSnapshot | None,
    deltas: dict[int, float],
    others: dict[int, tuple[Frame, ...]] | None,
    exclude: frozenset[int],
    loop_cpu: float | None,
) -> Diagnosis:
    """The loop sat in ``select()`` yet was late: another thread held the GIL, or no CPU."""
    candidates = {i: d for i, d in deltas.items() if i not in exclude and i != loop_ident}
    hog_ident = max(candidates, key=candidates.__getitem__) if candidates else None
    if hog_ident is not None and candidates[hog_ident] < _MIN_HOG_SHARE * duration:
        hog_ident = None  # an idle thread (a pool worker waiting for work) held nothing
    views = others or {}
    if hog_ident is None:
        # The hog may have exited: a thread seen busy (not waiting) in the last sample
        # and gone since (a live one was judged by its CPU clock above)...
        alive = after.cpu if after is not None and deltas else {}
        busy = [
            i
            for i, frames in views.items()
            if i != loop_ident
            and i not in exclude
            and i not in alive
            and frames
            and not _waiting(frames)
        ]
        # ...or alive before the stall and gone after it.
        hog_ident = next(iter(busy or _gone(before, after, exclude | {loop_ident})), None)
    if hog_ident is None:
        if deltas:  # clocks say no thread of ours ran: the OS kept the loop off the CPU
            return Diagnosis("scheduler", None, stacks, None, loop_cpu)
        return Diagnosis("gil", None, stacks, None, loop_cpu)
    name = (after.names.get(hog_ident) if after else None) or (
        before.names.get(hog_ident) if before else None
    )
    hog, culprit = _hog(hog_ident, views.get(hog_ident, ()), name, deltas)
    return Diagnosis("gil", culprit, stacks, hog, loop_cpu)
