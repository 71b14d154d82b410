"""Which threads are inside a trio run: ``trio.run`` and trio guest runs, tracked.

trio has no ``_get_running_loop()`` the fast path could ask, so while a guard runs
``trio.run`` and ``trio.lowlevel.start_guest_run`` are replaced by functions that
count the calling thread in :data:`_trio_threads` for as long as the run lasts. The
replacements' fast path only asks whether that dict is empty; the slow path asks
:func:`in_trio_task` whether the current thread is inside a trio task right now.
"""

from __future__ import annotations

import _thread
import functools
import sys
from typing import Any

# Threads inside trio.run / a trio guest run, with a nesting count. Mutated under
# _trio_lock; read without it on the fast path (an empty dict is all it asks).
_trio_threads: dict[int, int] = {}
_trio_lock = _thread.allocate_lock()
_get_ident = _thread.get_ident


def in_trio_task() -> bool:
    """True when the calling thread runs trio and is inside one of its tasks now."""
    if _get_ident() not in _trio_threads:
        return False
    # Between its steps (a guest run's host waiting, code around trio.run) the
    # thread is not running the loop: only code inside a trio task counts.
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_task())


def _trio_enter(ident: int) -> None:
    with _trio_lock:
        _trio_threads[ident] = _trio_threads.get(ident, 0) + 1


def _trio_leave(ident: int) -> None:
    with _trio_lock:
        left = _trio_threads.get(ident, 0) - 1
        if left > 0:
            _trio_threads[ident] = left
        else:
            _trio_threads.pop(ident, None)


def _make_trio_run(original: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        ident = _get_ident()
        _trio_enter(ident)
        try:
            return original(*args, **kwargs)
        finally:
            _trio_leave(ident)

    functools.update_wrapper(run, original, updated=())
    return run


def _make_trio_guest(original: Any) -> Any:
    def start_guest_run(*args: Any, **kwargs: Any) -> Any:
        done = kwargs.get("done_callback")
        if done is None:
            return original(*args, **kwargs)
        ident = _get_ident()
        left = [False]

        def leave() -> None:
            if not left[0]:
                left[0] = True
                _trio_leave(ident)

        def done_callback(outcome: Any) -> Any:
            leave()
            return done(outcome)

        kwargs["done_callback"] = done_callback
        _trio_enter(ident)
        try:
            return original(*args, **kwargs)
        except BaseException:
            leave()
            raise

    functools.update_wrapper(start_guest_run, original, updated=())
    return start_guest_run


def _after_fork_in_child() -> None:
    """Only the forking thread exists in the child: forget other threads' runs and the lock."""
    global _trio_lock
    _trio_lock = _thread.allocate_lock()
    me = _get_ident()
    for ident in [i for i in _trio_threads if i != me]:
        _trio_threads.pop(ident, None)


# Not catalogue entries: patched alongside them, they tell the fast path which threads
# run trio. Attribute paths relative to the ``trio`` module, and what replaces each.
TRIO_TARGETS: list[tuple[str, Any]] = [
    ("run", _make_trio_run),
    ("lowlevel.start_guest_run", _make_trio_guest),
]
