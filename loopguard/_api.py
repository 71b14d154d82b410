"""The process-wide lifecycle: :func:`install`, :func:`uninstall`, :func:`watch`."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ._blocking import Allow
from ._watchdog import (
    MAX_WINDOW,
    BlockingMode,
    Config,
    LoopLoad,
    Watchdog,
    lag_of,
    load_of,
    running,
    watches_of,
)
from .events import Event, Stall
from .sinks import Sink

__all__ = [
    "current",
    "install",
    "install_config",
    "loop_lag",
    "loop_load",
    "recent_stalls",
    "report",
    "uninstall",
    "watch",
]

logger = logging.getLogger("loopguard")
_installed: Watchdog | None = None
_lock = threading.Lock()


def _config(arguments: dict[str, Any]) -> Config:
    """A Config from a function's ``locals()``: its named options and ``**unknown``."""
    unknown = arguments.pop("unknown")
    return Config.from_options({**arguments, **unknown})


def install(
    threshold: float = 0.1,
    interval: float | None = None,
    *,
    log: bool = True,
    json: str | os.PathLike[str] | None = None,
    callback: Callable[[Event], object] | None = None,
    sinks: Sequence[Sink] = (),
    record: int = 1000,
    stats: bool = False,
    precise: bool = False,
    slow_callback: float | None = None,
    gil_dump: bool = True,
    blocking: BlockingMode = "off",
    blocking_allow: Sequence[str | Allow] = (),
    full_stacks: bool = False,
    **unknown: NoReturn,
) -> Watchdog:
    """Start the process-wide watchdog; every event loop that runs is watched.

    Loops that start afterwards in any thread (``asyncio.run``, ``Runner``,
    ``new_event_loop().run_until_complete``, uvloop, ``anyio.run(backend="trio")``)
    and the loop running in the calling thread are watched until :func:`uninstall`.

    Calling ``install`` again while installed returns the same watchdog; if the
    options differ a warning says that they were not applied (uninstall first).

    Args:
        threshold: Seconds the loop must be held to count as a stall.
        interval: Heartbeat and sampling period (default ``min(0.02, threshold/4)``).
        log: Log each stall as a WARNING on the ``loopguard`` logger.
        json: Append every event as one JSON line to this file.
        callback: Called with each event, on loopguard's sampler thread.
        sinks: Further sinks (objects with ``emit(event)``).
        record: How many recent events the watchdog keeps in memory.
        stats: Collect loop statistics (``Watchdog.stats()`` and the utilization,
            time, pending-callback and task metrics); costs a timer read per loop
            iteration.
        precise: Time every callback on asyncio's own loops; callbacks longer than
            ``slow_callback`` (but shorter than ``threshold``) become
            ``SlowCallback`` events. uvloop and trio: noted once, watchdog only.
        slow_callback: Precise mode's report threshold (default ``threshold/2``).
        gil_dump: Name the line of C code that holds the GIL from a capture read
            from outside the process (py-spy in a helper process; never pauses or
            writes to the process). On by default; see :class:`~loopguard.Config`.
        blocking: Blocking-call guard for calls made on loop threads: ``"warn"``
            (log each with its stack and duration), ``"raise"`` (refuse it with
            ``BlockingCallError``), ``"record"`` (event only) or ``"off"``.
        blocking_allow: Allow rules for the guard (``Allow`` or text
            ``module[:function][@call,...]``), on top of the defaults.
        full_stacks: Show every frame of a stack in logged reports; by default
            the frames that are not the user's are folded around the culprit's line.
        **unknown: Rejected: any other keyword raises ``ValueError``.

    Returns:
        The running :class:`Watchdog`.

    Raises:
        ValueError: An option is unknown or invalid (the message names it).
        OSError: The ``json`` file cannot be opened for appending.
    """
    config = _config(dict(locals()))  # the options as named above (tested against Config)
    return install_config(config)


def install_config(config: Config) -> Watchdog:
    """Like :func:`install`, with a ready :class:`Config` (e.g. ``Config.from_env()``)."""
    global _installed
    with _lock:
        if _installed is not None and _installed.running:
            if _installed.config != config:
                logger.warning(
                    "loopguard.install() called again with different options; "
                    "the running watchdog is kept (call uninstall() first)"
                )
            return _installed
        _installed = Watchdog(config).start()
        return _installed


def uninstall() -> None:
    """Stop the process-wide watchdog and restore everything it replaced.

    A no-op when nothing is installed.
    """
    global _installed
    with _lock:
        wd, _installed = _installed, None
    if wd is not None:
        wd.stop()


def current() -> Watchdog | None:
    """Return the process-wide watchdog if one is installed."""
    return _installed if _installed is not None and _installed.running else None


def watch(
    threshold: float = 0.1,
    interval: float | None = None,
    *,
    log: bool = False,
    json: str | os.PathLike[str] | None = None,
    callback: Callable[[Event], object] | None = None,
    sinks: Sequence[Sink] = (),
    record: int = 1000,
    stats: bool = False,
    precise: bool = False,
    slow_callback: float | None = None,
    gil_dump: bool = True,
    **unknown: NoReturn,
) -> Watchdog:
    """Return a new, independent watchdog to use as a context manager.

    ``with loopguard.watch() as wd:`` watches the loop running in this thread (if
    any) and every loop started inside the block; ``wd.stalls`` lists what it saw.
    It runs beside a process-wide watchdog without touching it.

    Args:
        threshold: Seconds the loop must be held to count as a stall.
        interval: Heartbeat and sampling period (default ``min(0.02, threshold/4)``).
        log: Also log each stall (off by default in the scoped form).
        json: Append every event as one JSON line to this file.
        callback: Called with each event, on loopguard's sampler thread.
        sinks: Further sinks.
        record: How many recent events to keep in memory.
        stats: Collect loop statistics (see :func:`install`).
        precise: Time every callback (see :func:`install`).
        slow_callback: Precise mode's report threshold (default ``threshold/2``).
        gil_dump: Name the line of C code that holds the GIL from a capture read
            from outside the process (py-spy in a helper process; never pauses or
            writes to the process). On by default; see :class:`~loopguard.Config`.
        **unknown: Any other :class:`~loopguard.Config` option (``blocking``,
            ``blocking_allow``...); a name that is not one raises ``ValueError``.

    Returns:
        A not yet started :class:`Watchdog`; ``with`` starts and stops it.
    """
    return Watchdog(_config(dict(locals())))


def report(event: Event) -> int:
    """Hand an event to the sinks of every running watchdog (log, JSON lines, callback).

    For code outside loopguard that has something to add to loopguard's event stream,
    such as the guarded WebSocket receiver explaining why it closed a connection. The
    sinks run on a short-lived thread, so the caller (often the loop thread) never
    waits for them. When no running watchdog logs, the event is logged as a WARNING
    on the ``loopguard`` logger instead, so it is never lost silently. Never raises.

    Args:
        event: A loopguard event (a frozen dataclass from :mod:`loopguard.events`).

    Returns:
        How many watchdogs received it.
    """
    try:
        watchdogs = running()
        if not any(wd.logs for wd in watchdogs):
            logger.warning("%s", event)
        for wd in watchdogs:
            wd.report(event)
        return len(watchdogs)
    except Exception:
        logger.exception("loopguard could not report %s", type(event).__name__)
        return 0


def recent_stalls(seconds: float) -> list[Stall]:
    """Stalls that any running watchdog reported and that ended in the last ``seconds``.

    A stall is reported once the loop runs again, so one still in progress is not
    listed. A stall seen by two watchdogs (``install()`` and a ``watch()`` block) is
    listed once.

    Args:
        seconds: How far back to look, in seconds of wall-clock time.

    Returns:
        The stalls, oldest first.
    """
    since = time.time() - seconds
    found: dict[tuple[float, object], Stall] = {}
    for wd in running():
        for stall in wd.stalls:
            if stall.started_at + stall.duration >= since:
                found.setdefault((round(stall.started_at, 3), stall.culprit), stall)
    return sorted(found.values(), key=lambda s: s.started_at)


def loop_load(
    window: float = 10.0, loop: asyncio.AbstractEventLoop | None = None
) -> LoopLoad | None:
    """How loaded an event loop has been over the last ``window`` seconds.

    Read from the heartbeats of a running watchdog (``install()`` or ``watch()``)
    that watches the loop: the delay percentiles are the heartbeat's lateness, the
    utilization the share of time spent running callbacks (with ``stats=True``, on
    asyncio's own loops). Cheap enough to call a few times a second; a load shedder
    should cache the reading rather than call it per request.

    Args:
        window: Seconds to look back, more than 0 and at most 60.
        loop: The asyncio (or uvloop) loop; default the loop running in the
            calling thread.

    Returns:
        A :class:`LoopLoad`, or ``None`` if no running watchdog watches the loop
        (or no loop is running in the calling thread).

    Raises:
        ValueError: ``window`` is not a number in (0, 60].
    """
    if (
        isinstance(window, bool)
        or not isinstance(window, (int, float))
        or not math.isfinite(window)
        or not 0 < window <= MAX_WINDOW
    ):
        raise ValueError(
            f"window must be a number of seconds in (0, {MAX_WINDOW:g}], got {window!r}"
        )
    watch = _watch_of(loop)
    return None if watch is None else load_of(watch, float(window))


def loop_lag(loop: asyncio.AbstractEventLoop | None = None) -> float | None:
    """How late the loop is right now, in seconds (0 when on time).

    The delay building up right now: called from a callback or task step, it says
    how long the loop has gone without running its heartbeat, that is how long the
    work ready before this one has been holding it; within one heartbeat period after
    a late heartbeat, it says how late that heartbeat was (the loop was held until a
    moment ago). Cheaper than :func:`loop_load` (no percentiles): a load shedder can
    call it on every request.

    Args:
        loop: The asyncio (or uvloop) loop; default the loop running in the
            calling thread.

    Returns:
        Seconds, or ``None`` if no running watchdog watches the loop.
    """
    global _lag_watch
    # Called per request by load shedders: the watch found last time is reused while
    # it watches this same loop.
    watch = _lag_watch
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
    if watch is None or watch.loop is not loop or not watch.attached:
        watch = _lag_watch = _watch_of(loop)
        if watch is None:
            return None
    return lag_of(watch)


_lag_watch: Any = None


def _watch_of(loop: asyncio.AbstractEventLoop | None) -> Any:
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
    watches = [w for w in watches_of(loop) if w.attached]
    # Of several watchdogs on one loop, one that measures utilization.
    return next((w for w in watches if w.stats is not None), watches[0] if watches else None)
