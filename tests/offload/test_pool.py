"""@offload's own worker threads on asyncio and uvloop: what anyio's workers offered stays.

The body can still call back into the loop and see its caller's cancel scope through
``anyio.from_thread``; the workers share anyio's default thread limit, leave once
their loop has closed, and a forked child makes its own.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
from helpers import BACKENDS

import loopguard
from loopguard._offload import pool

pytestmark = pytest.mark.anyio
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", BACKENDS[:2], indirect=True)


def test_the_fast_path_is_available() -> None:
    # If anyio's internals move, calls quietly go through anyio.to_thread: slower, but
    # this test says so.
    assert pool.available


@loopguard.offload
def thread_name() -> str:
    return threading.current_thread().name


@ASYNCIO_ONLY
async def test_asyncio_calls_run_in_loopguards_workers(anyio_backend: object) -> None:
    assert await thread_name() == pool.THREAD_NAME


async def _bump(box: list[int]) -> int:
    box.append(1)
    return len(box)


def _call_back(box: list[int]) -> int:
    return anyio.from_thread.run(_bump, box)


call_back_into_the_loop = loopguard.offload(_call_back)


async def test_the_body_can_call_back_into_the_loop(anyio_backend: object) -> None:
    box: list[int] = []
    assert await call_back_into_the_loop(box) == 1


@loopguard.offload
def stop_when_cancelled(started: threading.Event, stopped: list[str]) -> None:
    started.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            anyio.from_thread.check_cancelled()
        except BaseException as exc:  # the loop's cancellation class, read on the loop
            stopped.append(type(exc).__name__)
            raise
        time.sleep(0.005)
    stopped.append("ran to the end")


@pytest.mark.loopguard(blocking="off")  # the body sleeps in a worker, the test thread waits
async def test_check_cancelled_sees_the_callers_cancel_scope(anyio_backend: object) -> None:
    started = threading.Event()
    stopped: list[str] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_when_cancelled, started, stopped)
            while not started.is_set():
                await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
    assert stopped == [anyio.get_cancelled_exc_class().__name__]


@loopguard.offload
def raise_stop_iteration() -> None:
    raise StopIteration


async def test_stop_iteration_becomes_a_runtime_error(anyio_backend: object) -> None:
    with pytest.raises(RuntimeError) as info:
        await raise_stop_iteration()
    assert isinstance(info.value.__cause__, StopIteration)


class Together:
    """How many bodies ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def body(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.02)
        with self.lock:
            self.now -= 1


async def test_unlimited_calls_share_anyios_default_thread_limit(anyio_backend: object) -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    seen = Together()
    call = loopguard.offload(seen.body)
    limiter.total_tokens = 2
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(call)
    finally:
        limiter.total_tokens = 40
    assert seen.most == 2


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == pool.THREAD_NAME]


def _wait_for_no_workers(timeout: float) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout
    while _worker_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return _worker_threads()


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_workers_leave_once_their_loop_has_closed(use_uvloop: bool) -> None:
    assert _wait_for_no_workers(pool.IDLE_SECONDS + 5) == []  # left by earlier tests

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(loopguard.offload(time.sleep), 0.02)
        assert _worker_threads()  # the check below can fail

    anyio.run(main, backend_options={"use_uvloop": use_uvloop})
    assert _wait_for_no_workers(pool.POLL_SECONDS * 20) == []


def test_a_forked_child_makes_its_own_workers() -> None:
    async def square(x: int) -> int:
        return await loopguard.offload(pow)(x, 2)

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(square(3)) == 9  # the parent's workers exist now
        pid = os.fork()
        if pid == 0:  # the child: the parent's workers are not here; the loop is
            code = 0
            try:
                done = loop.run_until_complete(asyncio.wait_for(square(4), 10))
                code = 0 if done == 16 else 1
            except BaseException:
                code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        loop.close()


@ASYNCIO_ONLY
async def test_without_anyios_hooks_calls_go_through_anyio(
    anyio_backend: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "available", False)
    fallback = loopguard.offload(lambda: threading.current_thread().name)
    assert await fallback() == "AnyIO worker thread"
    box: list[int] = []
    assert await loopguard.offload(_call_back)(box) == 1
