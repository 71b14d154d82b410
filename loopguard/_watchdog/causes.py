"""Telling stall causes apart: thread CPU clocks and a traceback dump that needs no GIL.

Two instruments, both cheap enough to run on every sampler wake:

* :class:`CpuClocks` reads each Python thread's CPU clock
  (``time.pthread_getcpuclockid``). Comparing two readings says whether the loop
  thread was computing (CPU ≈ wall time) or waiting, and which other thread burned
  the CPU meanwhile (the GIL hog).
* :class:`GilFreeDump` arms ``faulthandler.dump_traceback_later`` a little beyond the
  sampler's next planned wake. If the sampler cannot run by then, because a thread
  holds the GIL in C code, faulthandler's own C thread writes every thread's Python
  stack to a private file without taking the GIL. The sampler parses it afterwards.
  If anyone else uses ``dump_traceback_later`` (pytest's ``faulthandler_timeout``,
  the application itself), loopguard steps aside until they cancel it.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import re
import sys
import tempfile
import threading
import time
from typing import IO, Any

from .._core.frames import PLUMBING, callback_frames, classify, culprit_of, is_idle
from .._core.patch import Patch
from ..events import Frame, Hog, StackSample
from .sampling import StackFolder

__all__ = [
    "DUMP",
    "CpuClocks",
    "CpuSnapshot",
    "Diagnosis",
    "GilFreeDump",
    "diagnose",
    "parse_dump",
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


_THREAD_RE = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-fA-F]+)")
_FRAME_RE = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')


def parse_dump(text: str) -> dict[int, tuple[Frame, ...]]:
    """Parse a faulthandler traceback dump into stacks per thread ident (innermost last)."""
    stacks: dict[int, list[Frame]] = {}
    current: list[Frame] | None = None
    for line in text.splitlines():
        head = _THREAD_RE.match(line)
        if head:
            current = stacks.setdefault(int(head.group(1), 16), [])
            continue
        frame = _FRAME_RE.match(line)
        if frame and current is not None:
            current.append(Frame(frame.group(1), int(frame.group(2)), frame.group(3)))
    return {ident: tuple(reversed(frames)) for ident, frames in stacks.items()}


_original_arm = faulthandler.dump_traceback_later
_original_cancel = faulthandler.cancel_dump_traceback_later


class GilFreeDump:
    """Owns loopguard's use of ``faulthandler.dump_traceback_later``."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._armed = False
        self.foreign = False  # someone else's dump is armed: do not touch the slot
        self._lock = threading.Lock()
        self.seq = 0  # bumped each time a dump is read
        self.latest: dict[int, tuple[Frame, ...]] = {}
        self._patches = [
            Patch(faulthandler, "dump_traceback_later", self._foreign_arm),
            Patch(faulthandler, "cancel_dump_traceback_later", self._foreign_cancel),
        ]

    def start(self) -> None:
        """Open the private dump file and watch for other users of the slot."""
        if self._file is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - kept open while running
        self.foreign = False
        for patch in self._patches:
            patch.activate()
        # A timer armed before we patched is invisible to us; the one we know of is
        # pytest's per-test faulthandler_timeout. Leave it alone until pytest cancels it.
        if _pytest_timer_armed():
            self.foreign = True

    def stop(self) -> None:
        """Cancel our dump, restore faulthandler's functions, close the file."""
        self.disarm()
        for patch in reversed(self._patches):
            patch.deactivate()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _foreign_arm(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        self._armed = False
        self.foreign = True
        return wrapped(*args, **kwargs)

    def _foreign_cancel(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        self.foreign = False
        self._armed = False
        return wrapped(*args, **kwargs)

    def arm(self, timeout: float) -> None:
        """Dump all threads if the sampler has not re-armed within ``timeout`` seconds."""
        with self._lock:
            if self.foreign or self._file is None:
                return
            try:
                _original_arm(timeout, repeat=False, file=self._file, exit=False)
                self._armed = True
            except (OSError, ValueError, RuntimeError):
                logger.debug("loopguard could not arm faulthandler", exc_info=True)

    def disarm(self) -> None:
        """Cancel loopguard's pending dump, if it is still ours."""
        with self._lock:
            self._disarm_locked()

    def _disarm_locked(self) -> None:
        if self._armed and not self.foreign:
            _original_cancel()
        self._armed = False

    # faulthandler's timer thread does not survive fork, and a child that re-arms a
    # timer armed before the fork waits forever for it: disarm across every fork.
    def _before_fork(self) -> None:
        self._lock.acquire()
        self._disarm_locked()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def poll(self) -> None:
        """If a dump fired, parse it into :attr:`latest` and bump :attr:`seq`."""
        with self._lock:
            f = self._file
            if f is None:
                return
            try:
                fd = f.fileno()
                if os.fstat(fd).st_size == 0:
                    return
                text = os.pread(fd, 1 << 20, 0).decode("utf-8", "replace")
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
            except (OSError, ValueError):
                return
            self.latest = parse_dump(text)
            self.seq += 1


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
    dump: dict[int, tuple[Frame, ...]] | None,
    others: dict[int, tuple[Frame, ...]] | None,
    exclude: frozenset[int] = frozenset(),
) -> Diagnosis:
    """Decide a stall's cause and culprit from samples, CPU clocks and a GIL-free dump.

    * Samples that show the loop in a callback: ``blocked``; culprit from samples.
    * Samples (or a dump) that show the loop idle in ``select()``: ``gil``; the hog
      is the other thread that used the most CPU, its stack from the last sample
      of all threads or from the dump; culprit is the hog's user frame.
    * No samples, but a dump, and the loop thread used more CPU during the stall
      than any other thread (or, without CPU clocks, the dump shows it inside a
      callback): ``c-held-gil``; culprit from the dump. If another thread used
      more, that thread held the GIL: ``gil``, as above.
    * Nothing observed: ``unknown``.

    Args:
        loop_ident: ``threading.get_ident()`` of the loop thread.
        duration: Length of the stall in seconds.
        folder: Samples of the loop thread taken during the stall, if any.
        before: CPU clocks read before the stall, if available.
        after: CPU clocks read after it, if available.
        dump: Stacks per thread from a faulthandler dump that fired during it.
        others: Stacks of the other threads at the last sample, if any.
        exclude: Thread idents never to blame (loopguard's own threads).

    Returns:
        The diagnosis.
    """
    deltas = _cpu_deltas(before, after)
    loop_cpu = None
    if loop_ident in deltas and duration > 0:
        loop_cpu = round(min(1.0, max(0.0, deltas[loop_ident] / duration)), 3)

    sampled = folder is not None and folder.total > 0
    candidates = {i: d for i, d in deltas.items() if i not in exclude}
    busiest = max(candidates, key=candidates.__getitem__) if candidates else None
    others_busy = [
        i
        for i, frames in (dump or {}).items()
        if i != loop_ident and i not in exclude and frames and not _waiting(frames)
    ]
    if sampled:
        assert folder is not None
        loop_stack = folder.top()
    elif dump and loop_ident in dump:
        loop_stack = dump[loop_ident]
    elif loop_cpu is not None:
        # No stack at all (no dump): the CPU clocks still tell the two GIL causes apart.
        # On a machine short of cores the loop thread may get well under one CPU while
        # it holds the GIL, so "busiest thread of the process" counts as well.
        if loop_cpu >= 0.5 or (busiest == loop_ident and loop_cpu >= 0.1):
            return Diagnosis("c-held-gil", None, (), None, loop_cpu)
        if busiest is not None and busiest != loop_ident:
            label = (after.names.get(busiest) if after else None) or hex(busiest)
            return Diagnosis(
                "gil", None, (), Hog(label, (), round(candidates[busiest], 4)), loop_cpu
            )
        # The hog may have exited during the stall: its clock is gone, its name is not.
        gone = _gone(before, after, exclude)
        if gone and before is not None:
            return Diagnosis(
                "gil", None, (), Hog(before.names.get(gone[0], hex(gone[0])), ()), loop_cpu
            )
        return Diagnosis("unknown", None, (), None, loop_cpu)
    else:
        return Diagnosis("unknown", None, (), None, loop_cpu)

    stacks = folder.folded() if sampled and folder is not None else (StackSample(1, loop_stack),)
    # With only a dump, the CPU clocks say who held the GIL. A thread waiting for the
    # GIL burns almost no CPU, so a loop thread busy most of the stall held it. Else
    # the thread that burned the most CPU did (a ratio: it holds on a machine short of
    # cores), unless that is the loop and the dump shows another thread busy (a hog
    # that has exited since, so its CPU clock could not be read).
    waiting = is_idle(loop_stack)  # a loop in select() holds nothing
    if not waiting and not sampled:
        if loop_cpu is not None and loop_cpu >= 0.5:
            waiting = False
        elif busiest is not None and busiest != loop_ident:
            waiting = True
        else:
            waiting = bool(others_busy) and (loop_cpu is None or loop_cpu < 0.5)
    if not waiting:
        culprit = culprit_of(callback_frames(loop_stack)) or culprit_of(loop_stack)
        return Diagnosis("blocked" if sampled else "c-held-gil", culprit, stacks, None, loop_cpu)

    # The loop was waiting for the GIL: name the thread that held it.
    candidates.pop(loop_ident, None)
    views = [v for v in (others, dump) if v]
    hog_ident = max(candidates, key=candidates.__getitem__) if candidates else None
    if hog_ident is not None and candidates[hog_ident] < _MIN_HOG_SHARE * duration:
        hog_ident = None  # an idle thread (a pool worker waiting for work) held nothing
    if hog_ident is None or not any(hog_ident in v for v in views):
        # The hog may have exited: fall back to a thread seen busy (not waiting) in a view.
        busy = [
            i
            for v in views
            for i, frames in v.items()
            if i != loop_ident and i not in exclude and frames and not _waiting(frames)
        ]
        hog_ident = busy[0] if busy else hog_ident
    if hog_ident is None:
        # Or it exited before the clocks were read again: alive before, gone after.
        hog_ident = next(iter(_gone(before, after, exclude | {loop_ident})), None)
    hog = None
    culprit = None
    if hog_ident is not None:
        frames = next((v[hog_ident] for v in views if hog_ident in v), ())
        name = (after.names.get(hog_ident) if after else None) or (
            before.names.get(hog_ident) if before else None
        )
        hog = Hog(
            name or hex(hog_ident),
            frames,
            round(deltas[hog_ident], 4) if hog_ident in deltas else None,
        )
        culprit = culprit_of(frames)
    return Diagnosis("gil", culprit, stacks, hog, loop_cpu)


def _pytest_timer_armed() -> bool:
    if "_pytest.faulthandler" not in sys.modules or "PYTEST_CURRENT_TEST" not in os.environ:
        return False
    for obj in gc.get_objects():
        if type(obj).__name__ == "Config" and type(obj).__module__ == "_pytest.config":
            try:
                return float(obj.getini("faulthandler_timeout") or 0) > 0
            except (ValueError, TypeError, AttributeError):
                return True  # cannot tell: assume it is armed
    return False


#: The process's single user of faulthandler's timer slot, shared by all watchdogs.
DUMP = GilFreeDump()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=DUMP._before_fork,
        after_in_parent=DUMP._after_fork_in_parent,
        after_in_child=DUMP._after_fork_in_child,
    )
