"""Probes: does this particular call block?

A probe runs on a loop thread before any guard is asked, with the original function
and the call's arguments. It answers :data:`~.check._RUN` (the call does not block:
a non-blocking socket, ``sleep(0)``, a zero timeout, a finished future),
:data:`~.check._BLOCKS`, or a result of its own when it could do the call without
blocking (an uncontended lock, a queued item). A probe and a call it lets through run
with the re-entrancy flag set: what they do inside is not checked again.
"""

from __future__ import annotations

import os
from typing import Any

from .check import _BLOCKS, _RUN, Probe


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _p_socket(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _RUN if args[0].gettimeout() == 0.0 else _BLOCKS


def _p_sleep(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    secs = _arg(args, kwargs, 0, "secs", None)
    return _RUN if isinstance(secs, (int, float)) and secs <= 0 else _BLOCKS


def _p_fd(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    get_blocking = getattr(os, "get_blocking", None)
    if get_blocking is None:
        return _BLOCKS
    return _BLOCKS if get_blocking(args[0]) else _RUN


def _p_sendfile(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _p_fd(original, (_arg(args, kwargs, 0, "out_fd", None),), {})


def _p_waitpid(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    options = _arg(args, kwargs, 1, "options", 0)
    return _RUN if options & getattr(os, "WNOHANG", 0) else _BLOCKS


def _p_open(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _RUN if isinstance(_arg(args, kwargs, 0, "file", None), int) else _BLOCKS


def _p_select(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    timeout = args[3] if len(args) > 3 else None
    return _RUN if timeout is not None and timeout <= 0 else _BLOCKS


def _p_poll(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    timeout = _arg(args, kwargs, 0, "timeout", None)
    return _RUN if timeout is not None and timeout == 0 else _BLOCKS


def _p_lock(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # original is the bound acquire of the real lock
    if not _arg(args, kwargs, 0, "blocking", True) or _arg(args, kwargs, 1, "timeout", -1) == 0:
        return _RUN
    return True if original(False) else _BLOCKS


def _p_semaphore(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not _arg(args, kwargs, 1, "blocking", True) or _arg(args, kwargs, 2, "timeout", None) == 0:
        return _RUN
    return True if original(args[0], False) else _BLOCKS


def _p_condition_enter(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return True if args[0]._lock.acquire(False) else _BLOCKS


def _p_timeout(index: int) -> Probe:
    def probe(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        timeout = _arg(args, kwargs, index, "timeout", None)
        return _RUN if timeout is not None and timeout <= 0 else _BLOCKS

    return probe


def _p_event_wait(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args[0].is_set():
        return _RUN
    return _p_timeout(1)(original, args, kwargs)


def _p_barrier_wait(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    barrier = args[0]
    count, parties = getattr(barrier, "_count", None), getattr(barrier, "_parties", None)
    if count is not None and parties is not None and count + 1 >= parties:
        return _RUN  # the last party to arrive does not wait
    return _BLOCKS


def _p_join(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not args[0].is_alive():
        return _RUN
    return _p_timeout(1)(original, args, kwargs)


def _p_queue_get(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import queue

    if not _arg(args, kwargs, 1, "block", True):
        return _RUN
    try:
        return original(args[0], False)
    except queue.Empty:
        return _BLOCKS


def _p_queue_put(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import queue

    if not _arg(args, kwargs, 2, "block", True) or args[0].maxsize <= 0:
        return _RUN
    try:
        return original(args[0], args[1] if len(args) > 1 else kwargs["item"], False)
    except queue.Full:
        return _BLOCKS


def _p_future(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _RUN if args[0].done() else _BLOCKS


def _p_popen_wait(original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _RUN if args[0].poll() is not None else _BLOCKS
