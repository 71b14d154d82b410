"""The worker threads that run offloaded calls: a pool per asyncio loop, trio's own.

It owns one small pool of worker threads per asyncio event loop and the hand-off of
one call to it, and the hand-off of one call to trio's worker threads. On asyncio a
call costs what the stdlib's ``asyncio.to_thread`` costs and no more: one queue put,
one ``call_soon_threadsafe`` back, one future. anyio's ``to_thread.run_sync`` adds two
loop round trips (a checkpoint and its limiter's) and a cancel scope per call, which on
a small machine made ``@offload`` half as slow again as the stdlib call it replaces.
On trio, trio's own threads are used as anyio uses them, without anyio's look-up of
the running backend on every call.

The workers stay usable from the body the way anyio's are: ``anyio.from_thread.run()``
and ``anyio.from_thread.check_cancelled()`` work in them (the thread is claimed for the
loop, and each call carries the caller's anyio cancel scope). That needs two names
from inside anyio; where they are missing :data:`available` is false and calls go
through ``anyio.to_thread`` instead.

A worker waits for work for :data:`IDLE_SECONDS` at most and leaves within
:data:`POLL_SECONDS` of its loop closing. Worker threads are daemons, and a forked
child starts with no pool (the parent's threads do not exist there).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from queue import Empty, SimpleQueue
from time import monotonic
from typing import Any

import anyio
import anyio.to_thread

__all__ = [
    "IDLE_SECONDS",
    "POLL_SECONDS",
    "THREAD_NAME",
    "Pool",
    "available",
    "in_trio_thread",
    "via_anyio",
    "pool_for",
]

IDLE_SECONDS = 10.0
"""A worker with no work for this long leaves (anyio's workers wait as long)."""

POLL_SECONDS = 0.5
"""How often an idle worker checks whether its loop has closed."""

THREAD_NAME = "@offload worker"
"""The name of every worker thread, as debuggers and profilers show it."""

Job = tuple[
    contextvars.Context,  # the caller's context, copied
    Callable[..., Any],  # what runs in the worker
    tuple[Any, ...],  # its arguments
    "asyncio.Future[Any]",  # where the result goes
    object,  # the caller's anyio cancel scope, or None
]

try:  # anyio's hooks for worker threads; if a version moves them, the fast path is off
    from anyio._backends._asyncio import AsyncIOBackend, TaskState, _task_states
    from anyio._core._eventloop import claim_worker_thread, threadlocals

    available = (
        "cancel_scope" in getattr(TaskState, "__slots__", ())
        and callable(getattr(_task_states, "get", None))
        and isinstance(threadlocals, threading.local)
    )
except ImportError:  # pragma: no cover - depends on anyio's internals
    available = False


def _cancel_scope() -> object:
    """The calling task's anyio cancel scope, for ``check_cancelled()`` in the body."""
    task = asyncio.current_task()
    state = _task_states.get(task) if task is not None else None
    return None if state is None else state.cancel_scope


class Pool:
    """The worker threads of one event loop, and the idle ones among them."""

    __slots__ = ("_default_limiter", "idle", "loop", "scope_of")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # A weak reference: the pool is the value of a weak-keyed table of loops.
        self.loop = weakref.ref(loop)
        self.idle: list[_Worker] = []
        self.scope_of: Callable[[], object] = _cancel_scope
        self._default_limiter: anyio.CapacityLimiter | None = None

    def default_limiter(self) -> anyio.CapacityLimiter:
        """The default thread limiter of anyio on this loop, shared with ``anyio.to_thread``."""
        limiter = self._default_limiter
        if limiter is None:
            limiter = self._default_limiter = anyio.to_thread.current_default_thread_limiter()
        return limiter

    def submit(
        self,
        future: asyncio.Future[Any],
        func: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        """Run ``func(*args)`` in a worker, in a copy of the caller's context.

        ``future`` gets its result or exception on the loop.
        """
        job: Job = (contextvars.copy_context(), func, args, future, self.scope_of())
        try:
            worker = self.idle.pop()
        except IndexError:
            worker = _Worker(self)
            worker.start()
        worker.queue.put(job)


class _Worker(threading.Thread):
    def __init__(self, pool: Pool) -> None:
        # Not "loopguard-...": the watchdog never blames its own threads, and a body
        # that holds the GIL here is the user's work.
        super().__init__(name=THREAD_NAME, daemon=True)
        self.pool = pool
        self.queue: SimpleQueue[Job] = SimpleQueue()

    def run(self) -> None:
        pool = self.pool
        loop = pool.loop()
        if loop is None:
            return  # the loop is gone already
        with claim_worker_thread(AsyncIOBackend, loop):
            self._serve(pool, loop)

    def _serve(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        get = self.queue.get
        schedule = loop.call_soon_threadsafe
        report = self._report
        idle_since = monotonic()
        while True:
            try:
                context, func, args, future, scope = get(timeout=POLL_SECONDS)
            except Empty:
                if not loop.is_closed() and monotonic() - idle_since < IDLE_SECONDS:
                    continue
                try:
                    pool.idle.remove(self)
                except ValueError:
                    continue  # the loop has just taken this worker: a job is coming
                return
            threadlocals.current_cancel_scope = scope
            error: BaseException | None = None
            try:
                result = context.run(func, *args)
            except BaseException as exc:
                result = None
                error = exc
            finally:
                del threadlocals.current_cancel_scope
            del context, func, args, scope
            try:
                schedule(report, future, result, error)
            except RuntimeError:
                return  # the loop is closed: nobody is waiting any more
            del future, result, error
            idle_since = monotonic()

    def _report(
        self, future: asyncio.Future[Any], result: Any, error: BaseException | None
    ) -> None:
        # On the loop: the worker is free again, and the caller gets the outcome.
        self.pool.idle.append(self)
        if future.cancelled():
            return
        if error is None:
            future.set_result(result)
        elif isinstance(error, StopIteration):  # a future cannot carry StopIteration
            wrapped = RuntimeError("the offloaded function raised StopIteration")
            wrapped.__cause__ = error
            future.set_exception(wrapped)
        else:
            future.set_exception(error)


async def in_trio_thread(
    func: Callable[..., Any], args: tuple[Any, ...], limiter: anyio.CapacityLimiter | None
) -> Any:
    """Run ``func(*args)`` in one of trio's worker threads, as ``anyio.to_thread`` would.

    The same call as anyio's (trio's ``to_thread.run_sync`` in abandon mode, the thread
    claimed for anyio so that ``anyio.from_thread`` works in it), without anyio's
    look-up of the running backend on every call. ``limiter=None`` is trio's default
    thread limiter, which is also anyio's default on trio.
    """
    hop = _trio_hop or _load_trio_hop()
    return await hop(func, args, limiter)


_TrioHop = Callable[[Callable[..., Any], tuple[Any, ...], Any], Coroutine[Any, Any, Any]]
_trio_hop: _TrioHop | None = None


def _load_trio_hop() -> _TrioHop:
    global _trio_hop
    import trio
    import trio.to_thread

    try:
        from anyio._backends._trio import TrioBackend
    except ImportError:  # pragma: no cover - depends on anyio's internals
        _trio_hop = via_anyio
        return _trio_hop
    run_sync = trio.to_thread.run_sync
    current_token = trio.lowlevel.current_trio_token

    def claimed(token: object, func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        with claim_worker_thread(TrioBackend, token):
            return func(*args)

    async def hop(func: Callable[..., Any], args: tuple[Any, ...], limiter: Any) -> Any:
        return await run_sync(
            claimed, current_token(), func, args, abandon_on_cancel=True, limiter=limiter
        )

    _trio_hop = hop
    return hop


async def via_anyio(func: Callable[..., Any], args: tuple[Any, ...], limiter: Any) -> Any:
    """Run ``func(*args)`` through ``anyio.to_thread``, on any loop (the slow, safe way)."""
    return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True, limiter=limiter)


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pool] = weakref.WeakKeyDictionary()
_last: list[Pool] = []  # the pool used last: most programs have one loop


def pool_for(loop: asyncio.AbstractEventLoop) -> Pool:
    """The pool of ``loop`` (the running loop), made on first use."""
    try:
        pool = _last[0]
    except IndexError:
        pass
    else:
        if pool.loop() is loop:
            return pool
    pool = _pools.get(loop) or _pools.setdefault(loop, Pool(loop))
    _last[:] = [pool]
    return pool


def _forget_pools() -> None:
    # In a forked child the workers of the parent do not exist: start afresh.
    _pools.clear()
    _last.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)
