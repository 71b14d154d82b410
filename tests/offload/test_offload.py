"""@offload, adaptive offload, yielding() and checkpoint() on asyncio, uvloop and trio."""

from __future__ import annotations

import ast
import concurrent.futures
import contextvars
import inspect
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import re
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from helpers import BACKENDS, line_of, sleepy, spin

import loopguard
from loopguard.events import Event, Offloaded

if sys.version_info >= (3, 11):
    from typing import assert_type
else:
    from typing_extensions import assert_type

pytestmark = pytest.mark.anyio


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll without blocking the event loop."""
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)
    return predicate()


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    # Made and shut down outside the event loop: shutting down joins its threads.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pool") as executor:
        yield executor


# -- module-level functions: worker processes find them by module and name -------------


@loopguard.offload(process=True)
def square_in_process(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


@loopguard.offload(process=True)
def fail_in_process(message: str) -> None:
    raise ValueError(message)  # MARK:fail_in_process


@loopguard.offload(process=True)
def return_a_lock() -> object:
    return threading.Lock()


@loopguard.offload(process=True, cancellable=True)
def sleep_in_process(flag: str, seconds: float) -> None:
    Path(flag).write_text("started")
    time.sleep(seconds)


def double_where(x: int) -> tuple[int, str, int]:
    return 2 * x, threading.current_thread().name, os.getpid()


def fail_here(message: str) -> None:
    raise KeyError(message)  # MARK:fail_here


class LazyProcessPool(concurrent.futures.Executor):
    """A process pool started on first use (importing this module starts nothing)."""

    def __init__(self) -> None:
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        if self.pool is None:
            # spawn: forking a process that runs threads is unsafe (and warns).
            context = multiprocessing.get_context("spawn")
            self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context)
        return self.pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait, cancel_futures=cancel_futures)


_POOL = LazyProcessPool()


@loopguard.offload(executor=_POOL)
def pid_in_pool(x: int) -> tuple[int, int]:
    return x + 1, os.getpid()


@loopguard.offload(process=True)
def _two_args(a: int, b: object) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def _shutdown_pool() -> Iterator[None]:
    yield
    _POOL.shutdown(wait=True, cancel_futures=True)


# Read once at import: reading the file inside a test would block its event loop.
LINES = {
    name: line_of(f"MARK:{name}", __file__) for name in ("broken", "fail_in_process", "fail_here")
}


# -- the basics ------------------------------------------------------------------------


@loopguard.offload
def where(x: int) -> tuple[int, int]:
    """Return ``x`` doubled and the thread that ran it."""
    return x * 2, threading.get_ident()


async def test_runs_in_a_worker_thread(anyio_backend: object) -> None:
    value, thread = await where(21)
    assert value == 42
    assert thread != threading.get_ident()


async def test_name_docstring_signature_are_kept(anyio_backend: object) -> None:
    def original(a: int, b: str = "x", *, c: float = 1.0) -> str:
        """Docs of the original."""
        return f"{a}{b}{c}"

    wrapped = loopguard.offload(original)
    assert wrapped.__name__ == "original"
    assert wrapped.__qualname__ == original.__qualname__
    assert wrapped.__doc__ == "Docs of the original."
    assert wrapped.__module__ == __name__
    assert inspect.signature(wrapped) == inspect.signature(original)
    assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(wrapped)
    assert not inspect.iscoroutinefunction(original)
    assert await wrapped(1, "y", c=2.0) == "1y2.0"


async def test_typing_sees_the_awaitable_result(anyio_backend: object) -> None:
    value, thread = await where(1)
    assert_type(value, int)
    assert_type(thread, int)
    if TYPE_CHECKING:  # checked by mypy: the parameters are the function's own
        _ = where("not an int")  # type: ignore[arg-type]


class Account:
    def __init__(self) -> None:
        self.balance = 10

    @loopguard.offload(limit=2)
    def deposit(self, amount: int) -> tuple[int, int]:
        self.balance += amount
        return self.balance, threading.get_ident()

    @staticmethod
    @loopguard.offload
    def fee(amount: int) -> int:
        return amount // 10


async def test_methods_and_staticmethods(anyio_backend: object) -> None:
    account = Account()
    balance, thread = await account.deposit(5)
    assert balance == 15 == account.balance
    assert thread != threading.get_ident()
    assert await Account.fee(50) == 5
    assert await account.fee(70) == 7
    assert inspect.iscoroutinefunction(account.deposit)


async def test_contextvars_reach_the_worker_thread(anyio_backend: object) -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

    @loopguard.offload
    def read() -> str:
        return request_id.get()

    assert await read() == "-"
    request_id.set("abc")
    assert await read() == "abc"


async def test_exceptions_keep_their_traceback(anyio_backend: object) -> None:
    def broken(message: str) -> None:
        raise KeyError(message)  # MARK:broken

    with pytest.raises(KeyError) as info:
        await loopguard.offload(broken)("lost key")
    assert info.value.args == ("lost key",)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert (frames[-1].name, frames[-1].lineno) == ("broken", LINES["broken"])
    assert any(f.name == test_exceptions_keep_their_traceback.__name__ for f in frames)


# -- what cannot be offloaded, and bad options --------------------------------------------


def test_async_functions_are_refused_at_decoration() -> None:
    async def fetch() -> int:
        return 1

    async def stream() -> AsyncIterator[int]:
        yield 1

    def numbers() -> Iterator[int]:
        yield 1

    class AsyncCallable:
        async def __call__(self) -> None:
            pass

    with pytest.raises(TypeError, match=r"fetch is async already"):
        loopguard.offload(fetch)
    with pytest.raises(TypeError, match=r"async already"):
        loopguard.offload(limit=3)(fetch)
    with pytest.raises(TypeError, match=r"async already"):
        loopguard.offload(AsyncCallable())
    with pytest.raises(TypeError, match=r"async generator"):
        loopguard.offload(stream)
    with pytest.raises(TypeError, match=r"generator function .*numbers"):
        loopguard.offload(numbers)
    with pytest.raises(TypeError, match=r"needs a function, not int"):
        loopguard.offload(3)  # type: ignore[call-overload]
    # An offloaded function is async: offloading it twice is refused too.
    with pytest.raises(TypeError, match=r"async already"):
        loopguard.offload(where)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (
            {"process": True, "executor": concurrent.futures.ThreadPoolExecutor(1)},
            ValueError,
            "not both",
        ),
        ({"executor": object()}, TypeError, "concurrent.futures.Executor"),
        ({"limit": 0}, ValueError, "at least 1"),
        ({"limit": True}, TypeError, "limit"),
        ({"limit": 2.5}, TypeError, "limit"),
        ({"limit": ""}, ValueError, "non-empty"),
        ({"adaptive": -1}, ValueError, "budget"),
        ({"adaptive": float("nan")}, ValueError, "budget"),
        ({"adaptive": "fast"}, ValueError, "budget"),
        ({"name_in_metrics": 1}, TypeError, "name_in_metrics"),
    ],
)
def test_bad_options_are_refused(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        loopguard.offload(**options)


def test_process_mode_refuses_local_functions() -> None:
    def local(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"local.*top level of a module"):
        loopguard.offload(process=True)(local)
    with pytest.raises(TypeError, match=r"local"):
        loopguard.offload(process=True)(lambda: 1)
    pool = concurrent.futures.ProcessPoolExecutor(1)
    try:
        with pytest.raises(TypeError, match=r"local"):
            loopguard.offload(executor=pool)(local)
    finally:
        pool.shutdown()


# -- worker processes and executors ------------------------------------------------------


async def test_process_mode_runs_in_another_process(anyio_backend: object) -> None:
    with anyio.fail_after(60):
        value, pid = await square_in_process(12)
    assert value == 144
    assert pid != os.getpid()


async def test_process_mode_exception_carries_the_worker_traceback(anyio_backend: object) -> None:
    with anyio.fail_after(60), pytest.raises(ValueError, match="bad input") as info:
        await fail_in_process("bad input")
    remote = info.value.__cause__
    assert remote is not None
    assert "fail_in_process" in str(remote)
    assert f"line {LINES['fail_in_process']}" in str(remote)


async def test_process_mode_unpicklable_arguments_are_a_clear_error(anyio_backend: object) -> None:
    with pytest.raises(pickle.PicklingError, match=r"argument 2 \(\w*[Ll]ock\) cannot be pickled"):
        await _two_args(1, threading.Lock())
    with anyio.fail_after(60), pytest.raises(pickle.PicklingError, match=r"result \(lock\)"):
        await return_a_lock()


async def test_process_mode_cancellable_kills_the_worker(
    anyio_backend: object, tmp_path: Path
) -> None:
    flag = tmp_path / "started"
    started = time.monotonic()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sleep_in_process, str(flag), 60.0)
            while not await anyio.Path(flag).exists():
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert time.monotonic() - started < 30


async def test_thread_pool_executor(
    anyio_backend: object, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="-")
    marker.set("from the task")

    def body(x: int) -> tuple[int, str, str]:
        return x + 1, threading.current_thread().name, marker.get()

    value, thread, seen = await loopguard.offload(executor=pool)(body)(1)
    assert (value, seen) == (2, "from the task")
    assert thread.startswith("pool")
    with pytest.raises(KeyError) as info:
        await loopguard.offload(executor=pool)(fail_here)("missing")
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].lineno == LINES["fail_here"]


# ProcessPoolExecutor.submit() writes to its wake-up pipe from the calling thread.
@pytest.mark.loopguard(blocking="off")
async def test_process_pool_executor_with_a_decorated_function(anyio_backend: object) -> None:
    # The module attribute is the wrapper: the worker gets the function by reference.
    with anyio.fail_after(120):
        value, pid = await pid_in_pool(1)
    assert value == 2
    assert pid != os.getpid()


@pytest.fixture  # lives only as long as its test: dask runs an event loop of its own
def dask_executor() -> Iterator[concurrent.futures.Executor]:
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client.get_executor()


@pytest.mark.loopguard(enabled=False)  # dask runs its own event loop, with its own habits
async def test_dask_distributed_executor(
    anyio_backend: object, dask_executor: concurrent.futures.Executor
) -> None:
    double = loopguard.offload(executor=dask_executor, limit=2)(double_where)
    with anyio.fail_after(60):
        results = []
        async with anyio.create_task_group() as tg:
            for i in range(4):

                async def one(i: int = i) -> None:
                    results.append(await double(i))

                tg.start_soon(one)
    assert sorted(r[0] for r in results) == [0, 2, 4, 6]
    assert all("Dask" in thread for _v, thread, _pid in results)

    failing = loopguard.offload(executor=dask_executor)(fail_here)
    with anyio.fail_after(60), pytest.raises(KeyError, match="remote") as info:
        await failing("remote")
    assert "fail_here" in str(info.value.__cause__)


# -- limits ------------------------------------------------------------------------------


class Concurrency:
    """Counts how many bodies run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def body(self, seconds: float = 0.03) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(seconds)
        with self.lock:
            self.now -= 1


async def run_together(*calls: Callable[[], Any]) -> None:
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(call)


async def test_limit_per_function(anyio_backend: object) -> None:
    seen = Concurrency()
    limited = loopguard.offload(limit=2)(seen.body)
    await run_together(*[limited] * 6)
    assert seen.most == 2

    unlimited = Concurrency()
    await run_together(*[loopguard.offload(unlimited.body)] * 6)
    assert unlimited.most > 2  # the check above can fail


async def test_shared_named_limit(anyio_backend: object) -> None:
    seen = Concurrency()
    first = loopguard.offload(limit="test-shared")(seen.body)
    second = loopguard.offload(limit="test-shared")(seen.body)
    loopguard.set_offload_limit("test-shared", 1)
    await run_together(first, second, first, second)
    assert seen.most == 1
    loopguard.set_offload_limit("test-shared", 3)
    await run_together(*[first, second] * 3)
    assert seen.most == 3


async def test_unsized_shared_limit_is_a_clear_error(anyio_backend: object) -> None:
    nameless = loopguard.offload(limit="never-sized")(time.sleep)
    with pytest.raises(LookupError, match=r"set_offload_limit\('never-sized', N\)"):
        await nameless(0)
    with pytest.raises(ValueError, match="at least 1"):
        loopguard.set_offload_limit("x", 0)
    with pytest.raises(ValueError, match="empty"):
        loopguard.set_offload_limit("", 1)


async def test_capacity_limiter_instance(anyio_backend: object) -> None:
    seen = Concurrency()
    limiter = anyio.CapacityLimiter(1)
    await run_together(*[loopguard.offload(limit=limiter)(seen.body)] * 3)
    assert seen.most == 1


_contended = Concurrency()
_contended_call = loopguard.offload(limit=1)(_contended.body)


async def _contend() -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(_contended_call, 0.01)


def test_a_limit_serves_each_event_loop() -> None:
    # anyio limiters belong to one loop: the same function, limited, in three runs.
    anyio.run(_contend)
    anyio.run(_contend, backend="trio")
    anyio.run(_contend)
    assert _contended.most == 1


# -- cancellation ------------------------------------------------------------------------


class Gate:
    """A body that starts, waits to be released, and records that it finished."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def body(self) -> str:
        self.started.set()
        self.release.wait(10)
        self.finished.set()
        return "done"


async def wait_event(event: threading.Event) -> None:
    with anyio.fail_after(10):
        while not event.is_set():
            await anyio.sleep(0.005)


async def test_cancel_waits_for_a_started_call(anyio_backend: object) -> None:
    gate = Gate()
    call = loopguard.offload(gate.body)
    results: list[str] = []

    async def caller() -> None:
        results.append(await call())

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await wait_event(gate.started)
        tg.cancel_scope.cancel()
        threading.Timer(0.05, gate.release.set).start()
    # The task group could only finish once the body had returned; then the caller
    # got the cancellation, not the result.
    assert gate.finished.is_set()
    assert results == []


ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", BACKENDS[:2], indirect=True)


@ASYNCIO_ONLY
@pytest.mark.parametrize("mode", ["thread", "executor", "thread-limit"])
async def test_native_asyncio_cancellation_also_waits(
    anyio_backend: object, mode: str, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    # task.cancel() and wait_for() reach through anyio's shields: handled the same way.
    import asyncio

    gate = Gate()
    choices: dict[str, dict[str, Any]] = {
        "thread": {},
        "executor": {"executor": pool},
        "thread-limit": {"limit": 1},
    }
    options = choices[mode]
    call = loopguard.offload(**options)(gate.body)
    # The gate opens long after the timeout, so that a loop held up by a busy machine
    # still times out first (with 0.1 s, a 3.10 run once saw the call finish first).
    threading.Timer(0.5, gate.release.set).start()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(call(), 0.02)
    # A started call was waited for. On a busy machine the call may still have been
    # queued (for its thread or its limit) after 20 ms: then it was dropped, never run.
    assert gate.finished.is_set() == gate.started.is_set()

    gate = Gate()
    task = asyncio.ensure_future(loopguard.offload(**options)(gate.body)())
    await wait_event(gate.started)
    task.cancel()
    threading.Timer(0.05, gate.release.set).start()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.finished.is_set()


@ASYNCIO_ONLY
async def test_native_cancellation_keeps_the_limit_exact(anyio_backend: object) -> None:
    import asyncio

    first, second = Gate(), Gate()
    bodies = iter([first.body, second.body])
    call = loopguard.offload(limit=1, cancellable=True)(lambda: next(bodies)())
    task = asyncio.ensure_future(call())
    await wait_event(first.started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # released at once: cancellable
    assert not first.finished.is_set()
    follower = asyncio.ensure_future(call())
    await asyncio.sleep(0.1)
    assert not second.started.is_set()  # the first body still holds the slot
    first.release.set()
    await wait_event(second.started)
    second.release.set()
    assert await follower == "done"


async def test_cancellable_releases_the_caller_at_once(anyio_backend: object) -> None:
    gate = Gate()
    call = loopguard.offload(cancellable=True)(gate.body)
    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await wait_event(gate.started)
        tg.cancel_scope.cancel()
    assert not gate.finished.is_set()
    gate.release.set()
    await wait_event(gate.finished)


async def test_cancellable_keeps_the_limit_slot_until_the_body_returns(
    anyio_backend: object,
) -> None:
    first, second = Gate(), Gate()
    bodies = iter([first.body, second.body])
    call = loopguard.offload(cancellable=True, limit=1)(lambda: next(bodies)())
    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await wait_event(first.started)
        tg.cancel_scope.cancel()
    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.sleep(0.1)
        # The abandoned first body still runs: the second may not start yet.
        assert not second.started.is_set()
        first.release.set()
        await wait_event(second.started)
        assert first.finished.is_set()
        second.release.set()


@pytest.mark.parametrize("cancellable", [False, True])
async def test_cancel_before_start_drops_the_call(anyio_backend: object, cancellable: bool) -> None:
    blocker, queued = Gate(), Gate()
    bodies = iter([blocker.body, queued.body])
    call = loopguard.offload(limit=1, cancellable=cancellable)(lambda: next(bodies)())
    async with anyio.create_task_group() as outer:
        outer.start_soon(call)
        await wait_event(blocker.started)
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)  # waits for the slot
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        blocker.release.set()
    await anyio.sleep(0.05)
    assert not queued.started.is_set()


async def test_executor_cancel_before_start_and_while_running(
    anyio_backend: object, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    running, queued = Gate(), Gate()
    run_first = loopguard.offload(executor=pool)(running.body)
    run_second = loopguard.offload(executor=pool)(queued.body)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_first)
        await wait_event(running.started)
        tg.start_soon(run_second)
        await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
        threading.Timer(0.05, running.release.set).start()
    # The running call was seen through; the queued one never started.
    assert running.finished.is_set()
    assert not queued.started.is_set()


# -- adaptive mode -----------------------------------------------------------------------


def _adaptive_body(seconds: float) -> int:
    time.sleep(seconds)
    return threading.get_ident()


@pytest.mark.loopguard(blocking="off")  # runs blocking bodies inline on purpose
async def test_adaptive_runs_fast_calls_inline_then_moves_out(anyio_backend: object) -> None:
    events: list[Event] = []
    loopguard.install(log=False, callback=events.append)
    adaptive = loopguard.offload(adaptive=0.02)(_adaptive_body)
    loop_thread = threading.get_ident()

    assert [await adaptive(0) for _ in range(3)] == [loop_thread] * 3
    assert await adaptive(0.05) == loop_thread  # this call is paid on the loop ...
    assert await adaptive(0) != loop_thread  # ... the next ones are not
    assert await adaptive(0) != loop_thread

    assert await wait_until(lambda: any(isinstance(e, Offloaded) for e in events))
    [event] = [e for e in events if isinstance(e, Offloaded)]
    assert event.function == f"{__name__}._adaptive_body"
    assert event.duration >= 0.05
    assert event.budget == 0.02
    assert event.mode == "thread"
    assert event.definition is not None
    assert event.definition.line == _adaptive_body.__code__.co_firstlineno
    assert event.kind == "offloaded"
    as_json = json.loads(json.dumps(event.to_dict()))
    assert as_json["kind"] == "offloaded"
    assert as_json["definition"]["function"] == "_adaptive_body"


@pytest.mark.loopguard(blocking="off")  # runs blocking bodies inline on purpose
async def test_adaptive_switch_reaches_scoped_watchdogs_too(anyio_backend: object) -> None:
    installed: list[Event] = []
    loopguard.install(log=False, callback=installed.append)
    with loopguard.watch(log=False) as scoped:
        adaptive = loopguard.offload(adaptive=0.02)(_adaptive_body)
        await adaptive(0.05)
        assert await wait_until(lambda: any(isinstance(e, Offloaded) for e in scoped.events))
    assert await wait_until(lambda: any(isinstance(e, Offloaded) for e in installed))


@pytest.mark.loopguard(blocking="off")  # runs blocking bodies inline on purpose
async def test_adaptive_switch_is_logged_once(
    anyio_backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loopguard")
    adaptive = loopguard.offload(adaptive=True)(_adaptive_body)
    await adaptive(0)
    assert not caplog.records
    await adaptive(0.02)
    await adaptive(0.02)
    [record] = [r for r in caplog.records if r.name.startswith("loopguard")]
    assert record.name == "loopguard.offload"
    assert "_adaptive_body" in record.getMessage()
    assert "a worker thread from now on" in record.getMessage()


@pytest.mark.loopguard(blocking="off")  # runs blocking bodies inline on purpose
async def test_adaptive_switch_logged_by_the_watchdog_sink_only(
    anyio_backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loopguard")
    loopguard.install(log=True)
    adaptive = loopguard.offload(adaptive=0.01)(_adaptive_body)
    await adaptive(0.02)

    def switches() -> list[str]:  # not a stall of a loaded machine that names the body
        return [m for r in caplog.records if "inline budget" in (m := r.getMessage())]

    assert await wait_until(lambda: any("_adaptive_body" in m for m in switches()))
    await anyio.sleep(0.05)
    assert len([m for m in switches() if "_adaptive_body" in m]) == 1


@pytest.mark.loopguard(blocking="off")  # runs blocking bodies inline on purpose
async def test_adaptive_inline_exceptions_and_failed_reports(
    anyio_backend: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []

    def slow_failure() -> None:
        threads.append(threading.get_ident())
        time.sleep(0.02)
        raise RuntimeError("inline failure")

    def broken_report(event: object) -> None:
        raise OSError("sink gone")

    # loopguard.offload is the decorator; the module that reports the switch is
    # reached through sys.modules.
    monkeypatch.setattr(sys.modules["loopguard._offload.adaptive"], "_report", broken_report)
    adaptive = loopguard.offload(adaptive=0.01)(slow_failure)
    with pytest.raises(RuntimeError, match="inline failure") as info:
        await adaptive()
    assert info.traceback[-1].name == "slow_failure"
    with pytest.raises(RuntimeError, match="inline failure"):
        await adaptive()  # offloaded now, although reporting the switch failed
    assert threads[0] == threading.get_ident() != threads[1]


# -- the loop stays responsive -------------------------------------------------------------


@pytest.mark.loopguard(enabled=False)  # its control phase blocks the loop on purpose
async def test_loop_delay_stays_idle_while_offloaded_work_runs(anyio_backend: object) -> None:
    blocking = loopguard.offload(sleepy)
    await run_together(*[lambda: blocking(0)] * 4)  # start the worker threads first

    with loopguard.watch(threshold=0.08, interval=0.005) as idle:
        await anyio.sleep(0.4)

    with loopguard.watch(threshold=0.08, interval=0.005) as busy:
        for _ in range(4):
            await run_together(*[lambda: blocking(0.1)] * 4)

    with loopguard.watch(threshold=0.08, interval=0.005) as blocked:
        for _ in range(2):
            sleepy(0.1)
            await anyio.sleep(0.02)
        await anyio.sleep(0.1)

    idle_delay, busy_delay, blocked_delay = idle.delay(), busy.delay(), blocked.delay()
    numbers = {
        name: (h.count, round(h.percentile(50) * 1e3, 2), round(h.percentile(95) * 1e3, 2))
        for name, h in (("idle", idle_delay), ("busy", busy_delay), ("blocked", blocked_delay))
    }
    assert idle_delay.count > 20 and busy_delay.count > 20, numbers
    # Offloaded: the loop's typical delay is that of an idle loop, and its tail stays
    # far below the 100 ms each call blocks for. (Percentiles rather than the maximum:
    # on a busy machine the OS may pause the loop thread now and then, whatever it runs.)
    assert busy_delay.percentile(50) <= max(2 * idle_delay.percentile(50), 0.002), numbers
    assert busy_delay.percentile(95) < 0.03, numbers
    # The same work on the loop: the same metric sees it (so the checks above can fail).
    assert blocked_delay.max >= 0.09, numbers
    assert blocked.stalls, numbers


# -- yielding and checkpoint -------------------------------------------------------------


class Ticker:
    """A task that counts how often it gets to run."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await anyio.lowlevel.checkpoint()


@pytest.mark.loopguard(enabled=False)  # its control loop starves the loop on purpose
async def test_yielding_hands_control_back_when_the_budget_is_spent(anyio_backend: object) -> None:
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(0.01)

        before = ticker.ticks
        for _ in range(40):
            spin(0.001)
        assert ticker.ticks == before  # a plain loop starves the other task

        before = ticker.ticks
        items = []
        async for item in loopguard.yielding(range(40), every=0.01):
            spin(0.001)
            items.append(item)
        assert items == list(range(40))
        assert ticker.ticks - before >= 3

        before = ticker.ticks
        assert [i async for i in loopguard.yielding(range(1000), every=10.0)] == list(range(1000))
        assert ticker.ticks == before  # fast iteration never pays for a checkpoint

        before = ticker.ticks
        assert [i async for i in loopguard.yielding("abcde", every=0)] == list("abcde")
        assert ticker.ticks - before >= 4  # before every item but the first
        tg.cancel_scope.cancel()


async def test_yielding_over_an_async_iterable(anyio_backend: object) -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(20):
            spin(0.002)
            yield i  # never awaits anything: holds the loop on its own

    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(0.01)
        before = ticker.ticks
        assert [i async for i in loopguard.yielding(numbers(), every=0.005)] == list(range(20))
        assert ticker.ticks - before >= 3
        tg.cancel_scope.cancel()


async def test_yielding_lets_cancellation_in(anyio_backend: object) -> None:
    seen = 0
    with anyio.move_on_after(0.05) as scope:
        async for _ in loopguard.yielding(itertools.count(), every=0.005):
            seen += 1
            spin(0.0005)
    assert scope.cancelled_caught
    assert seen > 0


def test_yielding_rejects_a_bad_budget() -> None:
    with pytest.raises(ValueError, match="seconds >= 0"):
        loopguard.yielding([], every=-1)
    with pytest.raises(ValueError, match="seconds >= 0"):
        loopguard.yielding([], every=float("nan"))


async def test_checkpoint_lets_other_tasks_run(anyio_backend: object) -> None:
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(0.01)
        before = ticker.ticks
        spin(0.005)
        assert ticker.ticks == before
        # Trio may run the two tasks of one scheduling batch in either order: after
        # two checkpoints, a whole batch (with the ticker in it) has run.
        await loopguard.checkpoint()
        await loopguard.checkpoint()
        assert ticker.ticks > before
        tg.cancel_scope.cancel()


# -- the how-to pages' examples -------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("page", ["how-to/offload.md", "how-to/yielding.md"])
def test_how_to_examples_compile_and_complete_ones_run(
    page: str, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)
    assert blocks
    ran = 0
    for number, block in enumerate(blocks, 1):
        code = compile(block, f"{page}#{number}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        if "asyncio.run(" in block:  # a complete program
            exec(code, {"__name__": f"docs_example_{number}"})
            ran += 1
    assert ran >= 1
    assert capsys.readouterr().out.strip()  # the programs print their result
