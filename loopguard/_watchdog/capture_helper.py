"""The capture helper: a small process that reads its parent's stacks when the parent cannot.

Run by :mod:`.capture` as ``python -I -S capture_helper.py PARENT_PID PY_SPY``; it
imports the standard library only and never imports loopguard. It lives in its own
interpreter, so its own GIL: a C call holding the parent's GIL does not stop it.

Protocol, one text line per message:

* parent to helper (stdin): ``D <deadline> <stale>``: the parent's sampler thread
  expects to run again by ``deadline`` (``time.monotonic()``, the same clock in both
  processes on Linux), and a watched loop whose last heartbeat is older than ``stale``
  seconds is stalled; ``A``: the same two numbers are on the board from now on (the
  sampler writes them there at each wake, with no system call); ``X``: nothing to
  watch, wait. End of file: the parent closed the pipe or died; the helper exits.
* helper to parent (stdout): ``{"start": t}`` when a dump begins, then
  ``{"start": t, "end": t, "threads": [[ident, name, owns_gil, [[file, line,
  function], ...]], ...]}`` (frames innermost first) or ``{"start": t, "error": text}``.

The parent's heartbeat board (argument 3: a file descriptor of shared memory, or -1)
holds each watched loop's last heartbeat time, 0 for a free slot. When a deadline
passes with no new message, the sampler is starved. If every loop on the board has
ticked within ``stale`` seconds, the loops are healthy (only the sampler is shut out,
by a loop that releases and retakes the GIL many times a second): nothing is read, and
the board is looked at again every :data:`RECHECK` seconds until the sampler writes or
a loop goes stale. Otherwise the helper runs
``py-spy dump --pid PARENT --nonblocking --json``, which reads the parent's memory
with ``process_vm_readv``: it never writes to the parent and never pauses it. One dump
per starvation (retried once if the read raced the parent), then it waits for the
sampler to come back. A dump that takes longer than :data:`TIMEOUT` is killed.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

#: Seconds one py-spy dump may take before it is killed and reported as slow.
TIMEOUT = 2.0
#: How often to check that the parent is still alive while nothing else happens.
ALIVE_CHECK = 5.0
#: While the sampler is late but every loop ticks: how often to look at the board again.
RECHECK = 0.01


def _open_board(fd: int) -> Any:
    if fd < 0:
        return None
    try:
        size = os.fstat(fd).st_size
        return memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ)).cast("d")
    except (OSError, ValueError):
        return None


def _all_ticking(board: Any, stale: float) -> bool:
    """Every watched loop ticked within ``stale`` seconds (False without a board)."""
    if board is None or stale <= 0:
        return False
    now = time.monotonic()
    return all(t == 0.0 or now - t <= stale for t in board[:-2])  # the last two: the sampler's


def _emit(message: dict[str, object]) -> None:
    os.write(1, (json.dumps(message, separators=(",", ":")) + "\n").encode())


def _reduce(raw: bytes) -> list[list[object]]:
    threads = []
    for thread in json.loads(raw):
        frames = [[f["filename"], f["line"], f["name"]] for f in thread.get("frames") or ()]
        threads.append(
            [thread["thread_id"], thread.get("thread_name"), bool(thread.get("owns_gil")), frames]
        )
    return threads


def _error_of(stderr: bytes) -> str:
    """py-spy's message and its operating-system cause, without the backtrace."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    head = next((line for line in lines if line.startswith("Error:")), lines[0] if lines else "")
    cause = next((line.split(":", 1)[-1].strip() for line in lines if "os error" in line), "")
    return f"{head} ({cause})" if cause and cause not in head else head


def _dump(pid: int, py_spy: str) -> dict[str, object]:
    start = time.monotonic()
    _emit({"start": start})
    error = ""
    for _ in range(2):  # --nonblocking may race the target: one retry
        try:
            done = subprocess.run(
                [py_spy, "dump", "--pid", str(pid), "--nonblocking", "--json"],
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"start": start, "error": f"py-spy took longer than {TIMEOUT:g} s"}
        except OSError as exc:
            return {"start": start, "error": f"py-spy could not be started: {exc}"}
        if done.returncode == 0:
            try:
                return {"start": start, "end": time.monotonic(), "threads": _reduce(done.stdout)}
            except (ValueError, KeyError, TypeError) as exc:
                error = f"py-spy output was not understood: {exc}"
                continue
        error = _error_of(done.stderr) or f"py-spy exited with status {done.returncode}"
        if "denied" in error or "not permitted" in error:
            break
    return {"start": start, "error": error}


def main(argv: list[str]) -> int:
    """Watch the parent's sampler deadline; dump the parent when it passes and a loop is stale.

    With a board (argument 3) the deadline and the stale age are read from it, and the
    pipe only says ``A`` (armed: read the board) or ``X``; without one, ``D`` lines carry
    them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which closes us
    pid, py_spy = int(argv[1]), argv[2]
    board = _open_board(int(argv[3])) if len(argv) > 3 else None
    armed = False  # board mode: the sampler keeps its deadline on the board
    line_deadline: float | None = None
    line_stale = 0.0
    dumped_for: float | None = None  # one dump per starvation (per deadline)
    pending = b""
    while True:
        if board is not None:
            deadline = (board[-1] or None) if armed else None
            stale = board[-2]
        else:
            deadline, stale = line_deadline, line_stale
        now = time.monotonic()
        if deadline is None:
            timeout = ALIVE_CHECK
        elif now < deadline:
            timeout = deadline - now
        elif deadline == dumped_for or _all_ticking(board, stale):
            timeout = RECHECK  # dumped already, or healthy loops: look again soon
        else:
            dumped_for = deadline
            line_deadline = None if board is None else line_deadline
            _emit(_dump(pid, py_spy))
            continue
        ready, _, _ = select.select([0], [], [], min(timeout, ALIVE_CHECK))
        if os.getppid() != pid:
            return 0
        if ready:
            data = os.read(0, 65536)
            if not data:
                return 0
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"D "):
                    fields = line[2:].split()
                    line_deadline = float(fields[0])
                    line_stale = float(fields[1]) if len(fields) > 1 else 0.0
                elif line == b"A":
                    armed = True
                elif line == b"X":
                    armed, line_deadline = False, None


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)
