"""Limits on how many offloaded calls run at once.

It owns ``offload(limit=...)``'s per-function limits, the limits shared by name and
sized with :func:`set_offload_limit`, and the unbounded limiter that lets a call
that already holds its own slot past anyio's default one. Every limit is kept per
event loop, since an ``anyio.CapacityLimiter`` belongs to the loop that first uses it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import weakref
from collections.abc import Callable

import anyio

__all__ = ["Limit", "PerLoopLimit", "limiter_for", "set_offload_limit", "unbounded"]

Limit = int | str | anyio.CapacityLimiter | None
"""What ``offload(limit=...)`` takes."""


class PerLoopLimit:
    """A limit of ``total`` concurrent calls, with one ``CapacityLimiter`` per event loop.

    anyio's limiters belong to the loop that first uses them, while a decorated
    function may be called from several loops (threads, successive ``asyncio.run``,
    trio). The last loop's limiter is cached: looking it up costs a weak reference,
    not a run-variable lookup.
    """

    __slots__ = ("_by_loop", "_last", "total")

    def __init__(self, total: float) -> None:
        self.total = total
        self._by_loop: weakref.WeakKeyDictionary[object, anyio.CapacityLimiter] = (
            weakref.WeakKeyDictionary()
        )
        self._last: tuple[weakref.ref[object], anyio.CapacityLimiter] | None = None

    def limiter(self) -> anyio.CapacityLimiter:
        """The running loop's limiter, sized to the current ``total``."""
        key = _loop_key()
        last = self._last
        if last is not None and last[0]() is key:
            limiter = last[1]
        else:
            found = self._by_loop.get(key)
            if found is None:
                found = self._by_loop[key] = anyio.CapacityLimiter(self.total)
            limiter = found
            self._last = (weakref.ref(key), limiter)
        if limiter.total_tokens != self.total:
            limiter.total_tokens = self.total
        return limiter


def _loop_key() -> object:
    """The running event loop (asyncio, uvloop) or trio run, as a weak-referenceable key."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return trio.lowlevel.current_trio_token()


_shared_limits: dict[str, PerLoopLimit] = {}
_shared_lock = threading.Lock()

unbounded = PerLoopLimit(math.inf).limiter
"""The running loop's limiter without a bound, for calls that hold a slot of their own."""


def set_offload_limit(name: str, total: int) -> None:
    """Size a limit shared by every ``@offload(limit=name)`` function.

    At most ``total`` calls of all those functions together run at once, per event
    loop. It may be called before or after the functions are defined, and again
    to resize the limit.

    Args:
        name: The limit's name, as given to ``offload(limit=...)``.
        total: How many calls may run at once (at least 1).

    Raises:
        ValueError: ``total`` is less than 1 or ``name`` is empty.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"set_offload_limit(): total must be an int of at least 1, not {total!r}")
    if not name:
        raise ValueError("set_offload_limit(): the name must not be empty")
    with _shared_lock:
        shared = _shared_limits.get(name)
        if shared is None:
            _shared_limits[name] = PerLoopLimit(total)
        else:
            shared.total = total


def limiter_for(limit: Limit, user: str) -> Callable[[], anyio.CapacityLimiter | None]:
    """Return what gives, at call time, the limiter a call of ``user`` must hold.

    Args:
        limit: The function's ``offload(limit=...)``, already validated.
        user: The function's qualified name, for the error about an unsized shared limit.

    Returns:
        A function of no arguments: it returns the running loop's limiter, or ``None``
        without a limit, and raises ``LookupError`` while a shared limit has no size.
    """
    if limit is None or isinstance(limit, anyio.CapacityLimiter):
        fixed = limit
        return lambda: fixed
    if isinstance(limit, str):
        name = limit

        def shared_limiter() -> anyio.CapacityLimiter:
            shared = _shared_limits.get(name)
            if shared is None:
                raise LookupError(
                    f"{user} uses the shared offload limit {name!r}, which has no "
                    f"size: call loopguard.set_offload_limit({name!r}, N) first"
                )
            return shared.limiter()

        return shared_limiter
    return PerLoopLimit(limit).limiter
