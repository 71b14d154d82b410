"""The running watchdogs, and the hooks that attach them to every loop that starts.

Loops are found by wrapping ``run_forever`` of asyncio's ``BaseEventLoop`` and of
``uvloop.Loop`` (every ``asyncio.run``, ``Runner``, ``run_until_complete`` goes
through it) and ``trio.run`` (so ``anyio.run(backend="trio")`` too). The wrappers
are installed while at least one watchdog runs and removed after the last one stops.
Each running watchdog attaches to the loop; one of them reports the loop's metrics.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .._core.loops import loop_kind
from .._core.patch import Patch, cancel_import_hook, when_imported

# Fork handlers run in the order they were registered, and ours (below) restarts sampler
# threads in the child, which use the capture helper and the GC recorder: theirs must
# run first, so those modules are imported (and register theirs) before this one does.
from . import capture as _capture  # noqa: F401
from . import gcwatch as _gcwatch  # noqa: F401

if TYPE_CHECKING:
    from .loopwatch import LoopWatch
    from .watchdog import Watchdog

__all__ = ["all_watchdogs", "hand_over", "hooks_off", "hooks_on", "lock", "running", "watches_of"]


# Watchdogs that are running; the loop hooks attach each of them to every new loop.
_running: list[Watchdog] = []
lock = threading.RLock()


def running() -> tuple[Watchdog, ...]:
    """The watchdogs running now, in the order they started."""
    return tuple(_running)


def watches_of(loop: Any) -> list[LoopWatch]:
    """Every running watchdog's watch of ``loop``."""
    return [w for wd in list(_running) for w in list(wd._watches) if w.loop is loop]


def hand_over(watches: list[LoopWatch]) -> None:
    """Pass the metric duty of loops a stopping watchdog reported to another watchdog."""
    for watch in watches:
        if watch.reports:
            watch.reports = False
            heir = next((w for w in watches_of(watch.loop) if w.attached), None)
            if heir is not None:
                heir.reports = True


def _run_forever(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    kind = loop_kind(instance)
    watches = [w for wd in list(_running) if (w := wd._attach_safely(instance, kind))]
    try:
        return wrapped(*args, **kwargs)
    finally:
        for w in watches:
            w_wd, watch = w
            w_wd._detach(watch)


def _trio_run(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    if not args or not _running:
        return wrapped(*args, **kwargs)
    async_fn, rest = args[0], args[1:]
    watchdogs = list(_running)

    async def _with_heartbeat(*fn_args: Any) -> Any:
        for wd in watchdogs:
            wd._start_trio_heartbeat()
        return await async_fn(*fn_args)

    _with_heartbeat.__qualname__ = getattr(async_fn, "__qualname__", "main")
    _with_heartbeat.__name__ = getattr(async_fn, "__name__", "main")
    return wrapped(_with_heartbeat, *rest, **kwargs)


_PATCHES: list[Patch] = [Patch(asyncio.BaseEventLoop, "run_forever", _run_forever)]


def _patch_uvloop(module: ModuleType) -> None:
    if not _running:
        return
    patch = Patch(module.Loop, "run_forever", _run_forever)
    _PATCHES.append(patch)
    patch.activate()


def _patch_trio(module: ModuleType) -> None:
    if not _running:
        return
    patch = Patch(module, "run", _trio_run)
    _PATCHES.append(patch)
    patch.activate()


def hooks_on() -> None:
    """Wrap loop start-up (asyncio, and uvloop and trio when imported)."""
    _PATCHES[0].activate()
    when_imported("uvloop", _patch_uvloop)
    when_imported("trio", _patch_trio)


def hooks_off() -> None:
    """Remove every loop hook (the last watchdog stopped)."""
    cancel_import_hook("uvloop", _patch_uvloop)
    cancel_import_hook("trio", _patch_trio)
    for patch in reversed(_PATCHES):
        patch.deactivate()
    del _PATCHES[1:]


#: Every watchdog created (started or not), for fork handling.
all_watchdogs: weakref.WeakSet[Watchdog] = weakref.WeakSet()


def _after_fork() -> None:
    global lock
    lock = threading.RLock()
    for wd in list(all_watchdogs):
        wd._after_fork_in_child()


def _stop_all_at_exit() -> None:
    for wd in list(_running):
        with contextlib.suppress(Exception):
            wd.stop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
atexit.register(_stop_all_at_exit)
