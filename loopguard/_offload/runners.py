"""How one call of a decorated function runs, per mode: thread, process or executor.

It owns :class:`Runner`, what one decorated function needs at call time, and its
call paths: a worker thread through ``anyio.to_thread`` (the hot path), a worker
process through ``anyio.to_process``, or any ``concurrent.futures.Executor``. Each
path takes the call's limit slot, sees a started body through a cancellation unless
the function is ``cancellable``, and counts the call in the offload metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import pickle
from collections.abc import Callable, Coroutine
from time import perf_counter
from typing import Any, cast

import anyio
import anyio.to_process
import anyio.to_thread

from .. import metrics
from . import pool
from .common import Mode, qualified_name
from .limits import Limit, limiter_for, unbounded
from .remote import (
    check_importable,
    executor_entry,
    pickling_error,
    process_entry,
    remote_reference,
    unpack,
)
from .track import Track, active
from .waiting import see_through, wait_future

__all__ = ["Runner"]


class Runner:
    """What one decorated function needs at call time, and its call paths.

    Its :attr:`call` is the coroutine function that runs one call of ``func`` off
    the loop, in the way its options say.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        mode: Mode,
        executor: concurrent.futures.Executor | None,
        limit: Limit,
        cancellable: bool,
        name_in_metrics: bool | str,
    ) -> None:
        self.func = func
        self.name = qualified_name(func)
        self.mode = mode
        self.executor = executor
        self.cancellable = cancellable
        self.has_limit = limit is not None
        self.limiter = limiter_for(limit, self.name)
        self._remote: object = None
        attributes: dict[str, str] = {metrics.OFFLOAD_MODE: mode}
        if name_in_metrics:
            label = self.name if name_in_metrics is True else str(name_in_metrics)
            attributes[metrics.OFFLOAD_FUNCTION] = label
        self.attributes: metrics.Attributes = attributes
        self.active = active.slot(attributes)
        self.call: Callable[..., Coroutine[Any, Any, Any]] = (
            _thread_call(self) if mode == "thread" else self._call_elsewhere
        )
        if mode == "process" or isinstance(executor, concurrent.futures.ProcessPoolExecutor):
            check_importable(func, self.name)

    # The offloaded paths -------------------------------------------------------------

    async def _call_elsewhere(self, *args: Any, **kwargs: Any) -> Any:
        """Run one call in a worker process or an executor."""
        attributes = self.attributes
        active = self.active
        active.append(None)
        submitted = perf_counter()
        track = Track(None)
        try:
            if self.mode == "process":
                return await self._in_process(args, kwargs, track)
            return await self._in_executor(args, kwargs, track)
        finally:
            active.pop()
            track.report(submitted, attributes)

    async def _in_process(self, args: tuple[Any, ...], kwargs: dict[str, Any], track: Track) -> Any:
        payload = self._pickle_call(args, kwargs)
        track.limiter = self.limiter() or anyio.to_process.current_default_process_limiter()
        await track.acquire()
        try:
            if self.cancellable:  # anyio kills the worker process if we are cancelled
                reply = await anyio.to_process.run_sync(
                    process_entry, payload, cancellable=True, limiter=unbounded()
                )
            else:
                reply = await see_through(
                    anyio.to_process.run_sync, process_entry, payload, limiter=unbounded()
                )
        finally:
            track.release()  # the worker is done with the call, or was killed
        return unpack(pickle.loads(reply), track)

    async def _in_executor(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], track: Track
    ) -> Any:
        executor = cast(concurrent.futures.Executor, self.executor)
        track.limiter = self.limiter()
        await track.acquire()
        in_process = isinstance(executor, concurrent.futures.ThreadPoolExecutor)
        try:
            if in_process:
                context = contextvars.copy_context()
                future = executor.submit(context.run, _run_timed, track, self.func, args, kwargs)
            else:
                future = executor.submit(executor_entry, self._remote_target(), args, kwargs)
        except BaseException:
            track.release()
            raise
        # The executor owns the job now: it runs it or cancels it, and its future says
        # when either is over.
        track.claim_start()
        future.add_done_callback(track.finish)
        try:
            value = await wait_future(future, self.cancellable)
        except BaseException:
            track.leave()
            raise
        track.release()
        return value if in_process else unpack(value, track)

    # Helpers -------------------------------------------------------------------------

    def _remote_target(self) -> object:
        if self._remote is None:
            by_value = self.mode == "executor" and not isinstance(
                self.executor, concurrent.futures.ProcessPoolExecutor
            )
            self._remote = remote_reference(self.func, main_by_value=by_value)
        return self._remote

    def _pickle_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        target = self._remote_target()
        try:
            return pickle.dumps((target, args, kwargs), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise pickling_error(self.name, target, args, kwargs, exc) from exc


def _thread_call(runner: Runner) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Make the coroutine function that runs one call of ``runner.func`` in a thread.

    It is the hot path, and for a plain ``@offload`` it is the decorated function
    itself: one coroutine between the caller and the worker. On asyncio and uvloop
    the call goes to this subsystem's own workers, on trio to trio's (:mod:`.pool`);
    without the anyio hooks that needs, through ``anyio.to_thread``.
    """
    func = runner.func
    attributes = runner.attributes
    active = runner.active
    cancellable = runner.cancellable
    has_limit = runner.has_limit
    limiter_of = runner.limiter
    running_loop = asyncio._get_running_loop if pool.available else lambda: None
    on_trio = pool.in_trio_thread if pool.available else pool.via_anyio

    async def call_in_thread(*args: Any, **kwargs: Any) -> Any:
        loop = running_loop()
        # A limit slot is held by the call itself, not by the task, so that it lasts
        # as long as the body. Without a limit, anyio's default thread limiter applies.
        if loop is None:
            limiter = limiter_of() if has_limit else None
        else:
            workers = pool.pool_for(loop)
            limiter = limiter_of() if has_limit else workers.default_limiter()
        track = Track(limiter)
        active.append(None)
        submitted = perf_counter()
        try:
            if limiter is not None:
                await track.acquire()
            try:
                if loop is None:
                    result = await on_trio(
                        _run_tracked,
                        (track, func, args, kwargs),
                        None if limiter is None else unbounded(),
                    )
                else:
                    future = loop.create_future()
                    workers.submit(future, _run_tracked, (track, func, args, kwargs))
                    result = await future
            except BaseException as exc:
                await track.stop_waiting(exc, cancellable)
                raise
            track.release()
            return result
        finally:
            active.pop()
            track.report(submitted, attributes)

    return call_in_thread


def _run_timed(
    track: Track, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # Runs in the worker thread.
    track.started = perf_counter()
    try:
        return func(*args, **kwargs)
    finally:
        track.ended = perf_counter()


def _run_tracked(
    track: Track, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # Runs in an anyio worker thread.
    if not track.claim_start():
        return None  # the caller stopped waiting before the body started: skip it
    track.started = perf_counter()
    try:
        return func(*args, **kwargs)
    finally:
        track.ended = perf_counter()
        track.finish()
