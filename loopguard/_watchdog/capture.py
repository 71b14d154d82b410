"""Capture: every thread's stack read from outside the process while C code holds the GIL.

While a thread holds the GIL in C (a catastrophic regex, a C extension, a long
``json.loads``) no Python thread of this process can run, the sampler included, so
nothing inside the process can say which line called into C. A helper process can:
:mod:`.capture_helper` waits for the sampler's "I will run again by T" messages and,
when one is overdue, runs ``py-spy dump --nonblocking --json`` on this process. py-spy
reads memory with ``process_vm_readv``; it never writes to the process and, non
blocking, never pauses it, so a dump cannot crash what it reads (a read that races
the program fails with "Bad address" and is retried). It also says which thread held
the GIL at that moment: the direct evidence the cause rules need.

Cost while the loop is healthy: two stores into shared memory per sampler wake (its
deadline, on the board below; no system call) and one per heartbeat; the helper sleeps
in ``select()`` until that deadline, and py-spy runs only when the sampler is starved
*and* a watched loop has missed its heartbeat. A sampler can be shut out of
the GIL while every loop is healthy: a loop that releases the GIL for a moment in each
of many short iterations (uvloop's polls) wins it back each time before the waiting
sampler is scheduled. So each watched loop's heartbeat also writes its time into a
small shared-memory board (:class:`Board`, a ``memfd`` the helper maps read-only), and
the helper reads the process only when some loop's last heartbeat is older than the
limit the sampler sent with its deadline.

The helper starts at the first sampler wake (never on the loop thread), ends when the
last watchdog stops, when this process exits or dies (end of file on its stdin, parent
pid check), and is restarted in a forked child.

Where a dump cannot be taken (not Linux, py-spy not installed, the kernel refuses
the read, the helper killed or slow) the reason is logged once and carried by the
stalls that lack a line (``Stall.capture_error``).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import ctypes.util
import json
import logging
import mmap
import os
import select
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

from ..events import Frame

__all__ = ["CAPTURE", "READ_LATE", "Board", "Capture", "Dump", "find_py_spy"]

logger = logging.getLogger("loopguard")

_HELPER = str(Path(__file__).with_name("capture_helper.py"))
_PR_SET_PTRACER = 0x59616D61
# A helper that dies is restarted this many times per process, then left for dead.
_RESTARTS = 3
_KEEP = 16
#: Said of a stall whose capture was read after the loop ran again.
READ_LATE = "the capture was read after the stall had ended (a loaded machine delays it)"
# How far past a stall's measured end a capture may finish and still be of the stall.
_SLACK = 0.01


class Dump:
    """One capture: every thread's stack and which thread held the GIL."""

    __slots__ = ("end", "gil", "names", "stacks", "start")

    def __init__(
        self,
        start: float,
        end: float,
        stacks: dict[int, tuple[Frame, ...]],
        names: dict[int, str],
        gil: int | None,
    ) -> None:
        self.start = start
        self.end = end
        self.stacks = stacks  # outermost first, like every stack in loopguard
        self.names = names
        self.gil = gil

    @classmethod
    def parse(cls, message: dict[str, object]) -> Dump:
        """Build a dump from the helper's message (see :mod:`.capture_helper`)."""
        stacks: dict[int, tuple[Frame, ...]] = {}
        names: dict[int, str] = {}
        gil = None
        for ident, name, owns_gil, frames in message["threads"]:  # type: ignore[attr-defined]
            stacks[ident] = tuple(Frame(f, line, fn) for f, line, fn in reversed(frames))
            names[ident] = name or hex(ident)
            if owns_gil:
                gil = ident
        return cls(float(message["start"]), float(message["end"]), stacks, names, gil)  # type: ignore[arg-type]


def find_py_spy() -> str | None:
    """The py-spy binary: beside this interpreter (a virtualenv), in its scripts, on PATH."""
    for folder in (os.path.dirname(sys.executable), sysconfig.get_path("scripts")):
        path = os.path.join(folder, "py-spy")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("py-spy")


def _allow_helper_to_read(pid: int) -> None:
    """Under Yama ``ptrace_scope`` 1, name the helper (and its children) as our reader."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(_PR_SET_PTRACER, pid, 0, 0, 0)  # EINVAL without Yama: nothing to do
    except (OSError, AttributeError):
        pass


class Board:
    """Each watched loop's latest heartbeat, in memory the capture helper also maps.

    Slot ``i`` holds a ``time.monotonic()`` value, or 0 while free. The loop thread
    writes its slot at every heartbeat (one store into a ``memoryview``); the helper
    only reads. Linux only (``os.memfd_create``); elsewhere :meth:`take` returns -1 and
    nothing is written.
    """

    SLOTS = 256
    #: The last two slots are the sampler's: its deadline (0: nothing to watch) and the
    #: age of a heartbeat that counts as stale. Loops get the others.
    DEADLINE = SLOTS - 1
    STALE = SLOTS - 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fd = -1
        self._map: mmap.mmap | None = None
        # memoryview of C doubles (typed Any: typeshed's memoryview takes ints only).
        self._ticks: Any = None
        self._free: list[int] = []

    def open(self) -> bool:
        """Create the shared memory (once); False where it cannot be."""
        with self._lock:
            return self._open()

    def _open(self) -> bool:
        if self._ticks is not None:
            return True
        create = getattr(os, "memfd_create", None)
        if create is None:
            return False
        try:
            fd = create("loopguard-heartbeats", getattr(os, "MFD_CLOEXEC", 0))
            os.ftruncate(fd, 8 * self.SLOTS)
            self._map = mmap.mmap(fd, 8 * self.SLOTS)
        except OSError:
            return False
        self.fd = fd
        self._ticks = memoryview(self._map).cast("d")
        self._free = list(range(self.STALE - 1, -1, -1))
        return True

    def arm(self, deadline: float, stale: float) -> bool:
        """Write the sampler's deadline for the helper; False without shared memory."""
        ticks = self._ticks
        if ticks is None:
            return False
        ticks[self.STALE] = stale
        ticks[self.DEADLINE] = deadline
        return True

    def take(self, now: float) -> int:
        """A free slot, marked with ``now``; -1 if none (or no shared memory here)."""
        with self._lock:
            if not self._open() or not self._free:
                return -1
            slot = self._free.pop()
            assert self._ticks is not None
            self._ticks[slot] = now
            return slot

    def tick(self, slot: int, now: float) -> None:
        """Record a heartbeat (loop thread; no lock: one aligned 8-byte store)."""
        ticks = self._ticks
        if ticks is not None and slot >= 0:
            ticks[slot] = now

    def give_back(self, slot: int) -> None:
        """The loop is no longer watched: its slot reads as free (0)."""
        with self._lock:
            if self._ticks is not None and 0 <= slot < self.STALE and slot not in self._free:
                self._ticks[slot] = 0.0
                self._free.append(slot)

    def after_fork_in_child(self) -> None:
        """A private copy: the parent's board stays the parent's helper's to read."""
        self._lock = threading.Lock()
        old, old_map, old_fd = self._ticks, self._map, self.fd
        self._map, self._ticks, self.fd = None, None, -1
        if old is None or old_map is None:
            return
        ticks, free = old.tolist(), list(self._free)
        old.release()
        old_map.close()  # shared with the parent: never written from here again
        with contextlib.suppress(OSError):
            os.close(old_fd)
        if self._open():
            assert self._ticks is not None
            for slot, value in enumerate(ticks):  # the same slots, in memory of our own
                self._ticks[slot] = value
            self._free = free


class Capture:
    """The process's one helper, shared by every watchdog (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._dumps: collections.deque[Dump | tuple[float, str]] = collections.deque(maxlen=_KEEP)
        self._inflight: float | None = None
        self._restarts = 0
        self._said: set[str] = set()
        self._unavailable = False  # no platform support or no binary: not retried
        #: Why captures cannot be taken now (``None`` while they can).
        self.reason: str | None = None
        self.find = find_py_spy  # replaceable: which binary to run
        #: The heartbeats the helper checks before it reads the process.
        self.board = Board()
        self._boarded = False
        self._armed = False  # the helper was told to read the deadline from the board

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """One more watchdog uses captures; the helper itself starts at the first arm."""
        with self._lock:
            self._users += 1

    def stop(self) -> None:
        """One watchdog fewer; the last one ends the helper and waits for it."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                self._close()
                self._dumps.clear()
                self._restarts = 0
                self._unavailable = False
                self.reason = None

    def _close(self) -> int | None:
        """Let go of the helper and reap it; its exit status, or ``None`` if none ran."""
        proc, self._proc = self._proc, None
        self._inflight = None
        self._buffer = b""
        if proc is None:
            return None
        _close_pipes(proc)
        return _reap(proc)

    def _say(self, reason: str) -> None:
        self.reason = reason
        if reason not in self._said:
            self._said.add(reason)
            logger.warning("loopguard: %s", reason)

    def _spawn(self) -> bool:
        if not sys.platform.startswith("linux"):
            self.reason = (
                "lines of C code holding the GIL are named on Linux only; stalls keep "
                "their cause without the line"
            )
            return False
        py_spy = self.find()
        if py_spy is None:
            self._say(
                "py-spy is not installed, so lines of C code holding the GIL (and GIL "
                "hogs' lines) cannot be named; `pip install py-spy` to name them"
            )
            return False
        board = self.board.fd if self.board.open() else -1
        self._boarded = board >= 0  # the helper reads the board, not deadline lines
        self._armed = False
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _HELPER, str(os.getpid()), py_spy, str(board)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                pass_fds=(board,) if board >= 0 else (),
            )
        except OSError as exc:
            self._say(f"the capture helper process could not start ({exc})")
            return False
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        _allow_helper_to_read(self._proc.pid)
        self.reason = None
        return True

    def _alive(self) -> bool:
        """The helper runs (started now if needed); False if captures are unavailable."""
        if self._proc is not None:
            return True
        if self._users == 0 or self._restarts > _RESTARTS:
            return False
        if self._unavailable:
            return False  # missing binary or platform: said once, not retried
        self._unavailable = not self._spawn()
        return not self._unavailable

    def _lost(self) -> None:
        """The helper died: reap it, say so once, restart it at the next arm."""
        status = self._close()
        if status is None:
            return
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        self._restarts += 1
        self._say(
            f"the capture helper process {how}; "
            + ("it is restarted" if self._restarts <= _RESTARTS else "it is not restarted again")
        )

    # -- the sampler's side ------------------------------------------------------------

    def arm(self, deadline: float, stale: float) -> None:
        """Tell the helper the sampler runs again by ``deadline`` (monotonic).

        If it does not, the helper reads the process once some watched loop's last
        heartbeat is more than ``stale`` seconds old. With the heartbeat board this is
        two stores into shared memory (no system call: the sampler keeps the GIL);
        without it, a line on the helper's pipe.
        """
        with self._lock:
            if not self._alive():
                return
            if self._boarded and self.board.arm(deadline, stale):
                if self._armed:
                    return
                self._armed = True
                message = b"A\n"  # from now on the deadline is on the board
            else:
                message = b"D %.6f %.6f\n" % (deadline, stale)
        self._send(message)

    def disarm(self) -> None:
        """Nothing to watch: the helper waits without a deadline."""
        with self._lock:
            if self._proc is None:
                return
            self._armed = False
            self.board.arm(0.0, 0.0)
        self._send(b"X\n")

    def _send(self, message: bytes) -> None:
        with self._lock:
            if not self._alive():
                return
            proc = self._proc
            if proc is None or proc.stdin is None:
                return
            try:
                os.write(proc.stdin.fileno(), message)
            except OSError:
                self._lost()

    def poll(self) -> None:
        """Read whatever the helper wrote since the last look."""
        with self._lock:
            self._read()

    def _read(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        try:
            data = os.read(proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._take(line)

    def _take(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            start = float(message["start"])
        except (ValueError, KeyError, TypeError):
            return
        if "threads" in message:
            try:
                self._dumps.append(Dump.parse(message))
            except (ValueError, KeyError, TypeError):
                return
            self._inflight = None
            self.reason = None
        elif "error" in message:
            reason = _plain(str(message["error"]))
            self._dumps.append((start, reason))
            self._inflight = None
            self._say(reason)
        else:
            self._inflight = start

    def during(self, start: float, end: float, wait: float = 1.0) -> Dump | str | None:
        """The capture taken between ``start`` and ``end`` (monotonic).

        A capture still being taken is waited for, ``wait`` seconds at most.

        Returns:
            The dump (the one that saw a thread holding the GIL, if several); the
            reason no dump could be read; or ``None`` when none was attempted (the
            sampler was never starved long enough) and none is possible.
        """
        deadline = time.monotonic() + wait
        with self._lock:
            self._read()
            while (
                self._proc is not None
                and self._inflight is not None
                and start <= self._inflight <= end
                and time.monotonic() < deadline
            ):
                assert self._proc.stdout is not None
                select.select([self._proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                self._read()
            if self._inflight is not None and start <= self._inflight <= end:
                return f"the capture helper did not answer within {wait:g} s"
            found = [
                d for d in self._dumps if start <= (d.start if isinstance(d, Dump) else d[0]) <= end
            ]
            # py-spy reads the stacks last, just before it ends: a capture that ended
            # after the loop ran again shows where it went next, not what held it.
            dumps = [d for d in found if isinstance(d, Dump) and d.end <= end + _SLACK]
            if dumps:
                return next((d for d in dumps if d.gil is not None), dumps[0])
            if any(isinstance(d, Dump) for d in found):
                return READ_LATE
            if found:
                return found[-1][1]  # type: ignore[index]
            return self.reason

    # -- fork and exit -----------------------------------------------------------------

    def _before_fork(self) -> None:
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        # The helper reads the parent: the child closes its copies of the pipes (so the
        # parent's helper still sees end of file when the parent exits) and starts its own.
        self._lock = threading.Lock()
        proc, self._proc = self._proc, None
        if proc is not None:
            _close_pipes(proc)
            proc.returncode = 0  # not our child: never wait for it
        self._inflight = None
        self._buffer = b""
        self._dumps.clear()
        self._restarts = 0
        self.board.after_fork_in_child()

    def _at_exit(self) -> None:
        with self._lock:
            self._users = 0
            self._close()


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _reap(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the helper (end of file on its stdin ends it at once); kill it if slow."""
    try:
        return proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _plain(error: str) -> str:
    """py-spy's error, said in words a user can act on."""
    low = error.lower()
    if "denied" in low or "not permitted" in low or "os error 1)" in low:
        return (
            "the kernel refused to let py-spy read this process "
            f"({error}); lines of C code holding the GIL cannot be named. Allow ptrace "
            "for this user (kernel.yama.ptrace_scope, or CAP_SYS_PTRACE in a container)"
        )
    return f"py-spy could not read this process ({error})"


#: The process's one capture helper.
CAPTURE = Capture()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=CAPTURE._before_fork,
        after_in_parent=CAPTURE._after_fork_in_parent,
        after_in_child=CAPTURE._after_fork_in_child,
    )
atexit.register(CAPTURE._at_exit)
