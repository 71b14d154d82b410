"""Waiting for work that runs elsewhere, without blocking the loop, through cancellation.

It owns the primitives that the call paths wait with, on asyncio, uvloop and trio:
scheduling a callback on the loop from a worker thread, waiting for an event or a
coroutine to its end whatever cancellation arrives meanwhile, and waiting for an
executor's future (dropping the job if it has not started yet).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import anyio

__all__ = ["see_through", "shielded_wait", "threadsafe_scheduler", "wait_future"]

T = TypeVar("T")


def threadsafe_scheduler() -> Callable[[Callable[[], object]], None]:
    """Return a function that runs a callback on the current loop, from any thread."""
    schedule: Callable[[Callable[[], object]], object]
    try:
        schedule = asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        import trio

        schedule = trio.lowlevel.current_trio_token().run_sync_soon

    def soon(callback: Callable[[], object]) -> None:
        # The loop may have finished meanwhile; then there is nothing left to do.
        with contextlib.suppress(Exception):
            schedule(callback)

    return soon


async def wait_future(future: concurrent.futures.Future[T], cancellable: bool) -> T:
    """Wait for an executor's future without blocking the loop, on any backend."""
    done = anyio.Event()
    soon = threadsafe_scheduler()
    future.add_done_callback(lambda _: soon(done.set))
    try:
        await done.wait()
    except anyio.get_cancelled_exc_class():
        # Drop the job if it has not started; otherwise see it through, unless the
        # caller asked to be released at once.
        if not future.cancel() and not cancellable:
            await shielded_wait(done)
        raise
    return future.result()


async def shielded_wait(event: anyio.Event) -> None:
    """Wait until ``event`` is set, whatever cancellation arrives meanwhile."""
    with anyio.CancelScope(shield=True):
        while not event.is_set():
            try:
                await event.wait()
            except anyio.get_cancelled_exc_class():
                # Native asyncio cancellation (task.cancel(), wait_for) reaches
                # through a shield; the body is still running, so keep waiting.
                continue


async def see_through(func: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
    """Await ``func(*args, **kwargs)`` to its end even if the caller is cancelled.

    It runs in a shielded child task: neither a cancel scope nor a native asyncio
    cancellation of the caller reaches it, and the caller's cancellation is raised
    once it has finished.
    """
    outcome: list[Any] = []

    async def child() -> None:
        with anyio.CancelScope(shield=True):
            try:
                outcome.append(await func(*args, **kwargs))
            except BaseException as exc:
                outcome.append(_Raised(exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(child)
    value = outcome[0]
    if isinstance(value, _Raised):
        raise value.exc
    return cast(T, value)


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
