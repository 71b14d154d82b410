"""Moving blocking work off the event loop: ``@offload``, adaptive offload, ``yielding()``.

This module owns the fixes for a blocked loop:

* :func:`offload` turns a synchronous function into an async one whose body runs in a
  worker thread (``anyio.to_thread``, so asyncio, uvloop and trio all work), a worker
  process (``anyio.to_process``) or any ``concurrent.futures.Executor`` — dask's
  ``Client.get_executor()`` included, which is how offloaded work leaves the machine.
  With ``adaptive=`` it runs the function inline while it is fast and moves it to the
  worker once a call is seen to exceed a budget (an :class:`~loopguard.events.Offloaded`
  event and a log line say so).
* :func:`yielding` wraps a long iteration so that it hands control back to the loop
  whenever its time budget is spent; :func:`checkpoint` hands it back once.
* :func:`set_offload_limit` sizes a limit shared by name between functions.

Offloaded calls report ``loopguard.offload.*`` metrics through :mod:`loopguard.metrics`.
Nothing here runs at import time, and nothing is patched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import importlib
import inspect
import logging
import math
import pickle
import sys
import threading
import traceback
import types
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
)
from time import perf_counter
from typing import Any, Final, Generic, Literal, ParamSpec, TypeVar, cast, overload

import anyio
import anyio.lowlevel
import anyio.to_process
import anyio.to_thread

from .. import metrics
from .._watchdog import running
from ..events import Frame, Offloaded

__all__ = [
    "DEFAULT_BUDGET",
    "checkpoint",
    "offload",
    "set_offload_limit",
    "yielding",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

Mode = Literal["thread", "process", "executor"]
Limit = int | str | anyio.CapacityLimiter | None

DEFAULT_BUDGET: Final = 0.005
"""Seconds a call may hold the loop: adaptive ``@offload``'s and :func:`yielding`'s default."""

logger = logging.getLogger("loopguard.offload")

_ATTR = "_loopguard_offload"  # set on every wrapper; the value is its _Offload


# -- the decorator ---------------------------------------------------------------------


@overload
def offload(func: Callable[P, R], /) -> Callable[P, Coroutine[Any, Any, R]]: ...


@overload
def offload(
    *,
    process: bool = False,
    executor: concurrent.futures.Executor | None = None,
    limit: Limit = None,
    adaptive: bool | float = False,
    cancellable: bool = False,
    name_in_metrics: bool | str = False,
) -> Callable[[Callable[P, R]], Callable[P, Coroutine[Any, Any, R]]]: ...


def offload(
    func: Callable[..., Any] | None = None,
    /,
    *,
    process: bool = False,
    executor: concurrent.futures.Executor | None = None,
    limit: Limit = None,
    adaptive: bool | float = False,
    cancellable: bool = False,
    name_in_metrics: bool | str = False,
) -> Any:
    """Make a blocking function awaitable: its body runs off the event loop.

    Use it bare (``@offload``) or with options (``@offload(limit=4)``). The result is
    an ``async def`` function with the same name, docstring and signature; awaiting
    it runs the original body in a worker and returns its result. It works on
    asyncio, uvloop and trio, on functions and methods.

    Where the body runs:

    * default: a worker thread from anyio's pool (``anyio.to_thread.run_sync``).
      Context variables of the caller are visible in the body; an exception keeps
      its traceback.
    * ``process=True``: a worker process (``anyio.to_process.run_sync``). The
      function must be defined at the top level of a module; its arguments and
      result must pickle. The worker's traceback is attached to an exception as
      its ``__cause__``.
    * ``executor=``: any ``concurrent.futures.Executor``, for example
      ``dask.distributed.Client.get_executor()``. Context variables reach a
      ``ThreadPoolExecutor``'s threads only.

    Cancellation, whether it comes from a cancel scope (anyio, trio) or natively from
    asyncio (``task.cancel()``, ``wait_for``, a ``TaskGroup``):

    * a call that has not started (waiting for its ``limit``, for a worker process,
      or queued in the executor) is dropped at once; its body never runs;
    * a call that has started is seen through by default: the caller waits until
      the body returns, then gets the cancellation (the result is dropped). No work
      outlives the task that asked for it, and ``limit`` counts exactly the bodies
      running;
    * with ``cancellable=True`` the caller is released at once instead: a thread's
      body runs on to its end in the background, its result dropped, still holding
      its ``limit`` slot; a worker process is killed; an executor's future is
      cancelled (dask cancels the task; a thread pool cannot stop a running one).

    A long thread body can stop early by calling ``anyio.from_thread.check_cancelled()``
    now and then: it raises once the caller's cancel scope is cancelled (anyio and
    trio scopes; it does not see a native asyncio ``task.cancel()``).

    Args:
        func: The synchronous function (omit it to get a configured decorator).
        process: Run in a worker process instead of a thread.
        executor: Run in this executor instead of a thread.
        limit: At most this many calls of the function run at once (per event loop);
            further calls wait. A string names a limit shared by every function that
            names it, sized with :func:`set_offload_limit` (a call raises
            ``LookupError`` while it has no size). An ``anyio.CapacityLimiter`` is
            used as is (it then belongs to one event loop).
        adaptive: Run the function inline on the loop while it is fast; once a call
            takes longer than the budget (``True``: :data:`DEFAULT_BUDGET`, or a
            number of seconds) every later call is offloaded, and an
            :class:`~loopguard.events.Offloaded` event is reported and logged.
            Inline calls cost a clock read or two, not a thread hop; they are not
            counted in the offload metrics, and ``limit`` does not apply to them.
        cancellable: Release a cancelled caller at once rather than when the body
            returns (see above).
        name_in_metrics: Add a ``function`` attribute to this function's metrics:
            ``True`` for its qualified name, or the given string. Off by default so
            that metric cardinality stays bounded.

    Returns:
        The async function, or a decorator that makes one.

    Raises:
        TypeError: ``func`` is a coroutine function, an async generator function, a
            generator function or not callable; or ``process=True`` (or a
            ``ProcessPoolExecutor``) with a function that a worker process cannot
            import (a local function or a lambda).
        ValueError: An option is out of range, or both ``process`` and ``executor``
            were given.
    """
    options = _Options.validate(process, executor, limit, adaptive, cancellable, name_in_metrics)
    if func is None:
        return functools.partial(_decorate, options=options)
    return _decorate(func, options=options)


class _Options:
    __slots__ = ("budget", "cancellable", "executor", "limit", "mode", "name_in_metrics")

    def __init__(
        self,
        mode: Mode,
        executor: concurrent.futures.Executor | None,
        limit: Limit,
        budget: float | None,
        cancellable: bool,
        name_in_metrics: bool | str,
    ) -> None:
        self.mode = mode
        self.executor = executor
        self.limit = limit
        self.budget = budget
        self.cancellable = cancellable
        self.name_in_metrics = name_in_metrics

    @classmethod
    def validate(
        cls,
        process: bool,
        executor: concurrent.futures.Executor | None,
        limit: Limit,
        adaptive: bool | float,
        cancellable: bool,
        name_in_metrics: bool | str,
    ) -> _Options:
        if process and executor is not None:
            raise ValueError("offload(): give process=True or executor=, not both")
        if executor is not None and not isinstance(executor, concurrent.futures.Executor):
            raise TypeError(
                f"offload(executor=...) needs a concurrent.futures.Executor, "
                f"not {type(executor).__name__}"
            )
        if isinstance(limit, bool) or not (
            limit is None or isinstance(limit, (int, str, anyio.CapacityLimiter))
        ):
            raise TypeError(
                "offload(limit=...) takes an int, the name of a shared limit or an "
                f"anyio.CapacityLimiter, not {limit!r}"
            )
        if isinstance(limit, int) and limit < 1:
            raise ValueError(f"offload(limit=...) must be at least 1, not {limit}")
        if isinstance(limit, str) and not limit:
            raise ValueError("offload(limit=...): a shared limit needs a non-empty name")
        budget: float | None
        if adaptive is False:
            budget = None
        elif adaptive is True:
            budget = DEFAULT_BUDGET
        elif isinstance(adaptive, (int, float)) and math.isfinite(adaptive) and adaptive > 0:
            budget = float(adaptive)
        else:
            raise ValueError(
                f"offload(adaptive=...) takes True or a budget in seconds > 0, not {adaptive!r}"
            )
        if not isinstance(name_in_metrics, (bool, str)):
            raise TypeError("offload(name_in_metrics=...) takes a bool or a string")
        mode: Mode = "process" if process else "executor" if executor is not None else "thread"
        return cls(mode, executor, limit, budget, bool(cancellable), name_in_metrics)


def _decorate(func: Callable[..., Any], *, options: _Options) -> Callable[..., Any]:
    _check_sync(func)
    state = _Offload(func, options)
    budget = options.budget
    call = state.call

    if budget is None:
        if state.mode == "thread":
            wrapper = call  # a fresh function: the decorated function itself
        else:

            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                return await call(*args, **kwargs)

    else:
        clock = perf_counter  # a closure variable is read faster than a global

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if state.inline:
                # The fast path: no thread hop, two clock reads.
                start = clock()
                try:
                    return func(*args, **kwargs)
                finally:
                    elapsed = clock() - start
                    if elapsed > budget:
                        state.move_out(elapsed)
            return await call(*args, **kwargs)

    functools.update_wrapper(wrapper, func)
    setattr(wrapper, _ATTR, state)
    return wrapper


def _check_sync(func: object) -> None:
    if not callable(func):
        raise TypeError(f"offload() needs a function, not {type(func).__name__}")
    name = _qualified_name(func)
    call = type(func).__call__
    is_async_callable = (
        not inspect.isroutine(func)
        and not isinstance(func, (type, functools.partial))
        and (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call))
    )
    if inspect.iscoroutinefunction(func) or is_async_callable:
        raise TypeError(
            f"offload() needs a synchronous function; {name} is async already. Await it "
            "as it is, or offload the blocking calls inside it."
        )
    if inspect.isasyncgenfunction(func):
        raise TypeError(f"offload() needs a synchronous function; {name} is an async generator")
    if inspect.isgeneratorfunction(func):
        raise TypeError(
            f"offload() cannot offload the generator function {name}: calling it runs "
            "no code, and iterating it would still block the loop. Offload a function "
            "that builds the list, or iterate with loopguard.yielding()."
        )


def _qualified_name(func: object) -> str:
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}.{qualname}" if module else qualname


def _definition(func: object) -> Frame | None:
    code = getattr(inspect.unwrap(cast(Any, func)), "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    return Frame(code.co_filename, code.co_firstlineno, code.co_name)


# -- per-function state and the call paths ---------------------------------------------


class _Offload:
    """What one decorated function needs at call time."""

    def __init__(self, func: Callable[..., Any], options: _Options) -> None:
        self.func = func
        self.name = _qualified_name(func)
        self.mode = options.mode
        self.executor = options.executor
        self.budget = options.budget
        self.cancellable = options.cancellable
        self.inline = options.budget is not None
        self._switch_lock = threading.Lock()
        self._limit = _resolve_limit(options.limit)
        self._remote: object = None
        attributes: dict[str, str] = {"mode": self.mode}
        if options.name_in_metrics:
            attributes["function"] = (
                self.name if options.name_in_metrics is True else str(options.name_in_metrics)
            )
        self.attributes: metrics.Attributes = attributes
        self.active = _active.slot(attributes)
        self.call: Callable[..., Coroutine[Any, Any, Any]] = (
            _thread_call(self) if self.mode == "thread" else self._call_elsewhere
        )
        if self.mode == "process" or isinstance(
            self.executor, concurrent.futures.ProcessPoolExecutor
        ):
            _check_importable(func, self.name)

    # The offloaded paths -------------------------------------------------------------

    async def _call_elsewhere(self, *args: Any, **kwargs: Any) -> Any:
        """Run one call in a worker process or an executor."""
        attributes = self.attributes
        active = self.active
        active.append(None)
        submitted = perf_counter()
        track = _Track(None)
        try:
            if self.mode == "process":
                return await self._in_process(args, kwargs, track)
            return await self._in_executor(args, kwargs, track)
        finally:
            active.pop()
            track.report(submitted, attributes)

    async def _in_process(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], track: _Track
    ) -> Any:
        payload = self._pickle_call(args, kwargs)
        track.limiter = self._limiter() or anyio.to_process.current_default_process_limiter()
        await track.acquire()
        try:
            if self.cancellable:  # anyio kills the worker process if we are cancelled
                reply = await anyio.to_process.run_sync(
                    _process_entry, payload, cancellable=True, limiter=_unbounded()
                )
            else:
                reply = await _see_through(
                    anyio.to_process.run_sync, _process_entry, payload, limiter=_unbounded()
                )
        finally:
            track.release()  # the worker is done with the call, or was killed
        return _unpack(pickle.loads(reply), track)

    async def _in_executor(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], track: _Track
    ) -> Any:
        executor = cast(concurrent.futures.Executor, self.executor)
        track.limiter = self._limiter()
        await track.acquire()
        in_process = isinstance(executor, concurrent.futures.ThreadPoolExecutor)
        try:
            if in_process:
                context = contextvars.copy_context()
                future = executor.submit(context.run, _run_timed, track, self.func, args, kwargs)
            else:
                future = executor.submit(_executor_entry, self._remote_target(), args, kwargs)
        except BaseException:
            track.release()
            raise
        # The executor owns the job now: it runs it or cancels it, and its future says
        # when either is over.
        track.claim_start()
        future.add_done_callback(track.finish)
        try:
            value = await _wait_future(future, self.cancellable)
        except BaseException:
            track.leave()
            raise
        track.release()
        return value if in_process else _unpack(value, track)

    # Helpers -------------------------------------------------------------------------

    def _limiter(self) -> anyio.CapacityLimiter | None:
        limit = self._limit
        if limit is None or isinstance(limit, anyio.CapacityLimiter):
            return limit
        if isinstance(limit, str):
            shared = _shared_limits.get(limit)
            if shared is None:
                raise LookupError(
                    f"{self.name} uses the shared offload limit {limit!r}, which has no "
                    f"size: call loopguard.set_offload_limit({limit!r}, N) first"
                )
            return shared.limiter()
        return limit.limiter()

    def _remote_target(self) -> object:
        if self._remote is None:
            by_value = self.mode == "executor" and not isinstance(
                self.executor, concurrent.futures.ProcessPoolExecutor
            )
            self._remote = _remote_reference(self.func, main_by_value=by_value)
        return self._remote

    def _pickle_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        target = self._remote_target()
        try:
            return pickle.dumps((target, args, kwargs), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise _pickling_error(self.name, target, args, kwargs, exc) from exc

    # Adaptive mode ---------------------------------------------------------------------

    def move_out(self, elapsed: float) -> None:
        """Switch from inline to offloaded after a call took ``elapsed`` seconds."""
        with self._switch_lock:
            if not self.inline:
                return
            self.inline = False
        try:
            _report(
                Offloaded(
                    function=self.name,
                    duration=elapsed,
                    budget=cast(float, self.budget),
                    mode=self.mode,
                    definition=_definition(self.func),
                    task=_task_name(),
                )
            )
        except Exception:
            with contextlib.suppress(Exception):
                logger.exception("loopguard could not report that %s moved off the loop", self.name)


class _ActiveCalls:
    """Offloaded calls in progress, per attribute set, read when metrics are collected.

    Counting here and observing at collection time keeps two metric updates per call
    off the hot path (with an SDK, each costs several microseconds). Each attribute
    set has a list with one item per call in progress: ``append`` and ``pop`` are
    atomic, so calls from loops in several threads need no lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[tuple[tuple[str, str | bool | int | float], ...], list[None]] = {}
        self._watched = False

    def slot(self, attributes: metrics.Attributes) -> list[None]:
        """The list that counts the calls with these attributes."""
        key = tuple(sorted(attributes.items()))
        with self._lock:
            if not self._watched:
                self._watched = True
                metrics.observe(metrics.OFFLOAD_ACTIVE, self.values)
            return self._calls.setdefault(key, [])

    def values(self) -> list[tuple[float, metrics.Attributes | None]]:
        with self._lock:
            return [(len(calls), dict(key)) for key, calls in self._calls.items()]


_active = _ActiveCalls()


def _thread_call(state: _Offload) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Make the coroutine function that runs one call of ``state.func`` in a thread.

    It is the hot path, and for a plain ``@offload`` it is the decorated function
    itself: one coroutine between the caller and anyio.
    """
    func = state.func
    attributes = state.attributes
    active = state.active
    cancellable = state.cancellable
    has_limit = state._limit is not None
    limiter_of = state._limiter
    run_sync = anyio.to_thread.run_sync

    async def call_in_thread(*args: Any, **kwargs: Any) -> Any:
        # A limit slot is held by the call itself, not by the task, so that it lasts
        # as long as the body. Without a limit, anyio's default thread limiter applies.
        limiter = limiter_of() if has_limit else None
        track = _Track(limiter)
        active.append(None)
        submitted = perf_counter()
        try:
            if limiter is not None:
                await track.acquire()
            try:
                result = await run_sync(
                    _run_tracked,
                    track,
                    func,
                    args,
                    kwargs,
                    abandon_on_cancel=True,
                    limiter=None if limiter is None else _unbounded(),
                )
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
    track: _Track, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # Runs in the worker thread.
    track.started = perf_counter()
    try:
        return func(*args, **kwargs)
    finally:
        track.ended = perf_counter()


def _run_tracked(
    track: _Track, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
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


def _task_name() -> str | None:
    try:
        return anyio.get_current_task().name
    except Exception:
        return None


def _report(event: Offloaded) -> None:
    """Log the switch and hand the event to every running watchdog's sinks."""
    watchdogs = running()
    if not any(wd.logs for wd in watchdogs):
        logger.warning("%s", event)
    for wd in watchdogs:
        wd.report(event)


# -- limits ----------------------------------------------------------------------------


class _PerLoopLimit:
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


_shared_limits: dict[str, _PerLoopLimit] = {}
_shared_lock = threading.Lock()
_unbounded = _PerLoopLimit(math.inf).limiter


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
            _shared_limits[name] = _PerLoopLimit(total)
        else:
            shared.total = total


def _resolve_limit(limit: Limit) -> _PerLoopLimit | str | anyio.CapacityLimiter | None:
    if isinstance(limit, int):
        return _PerLoopLimit(limit)
    return limit


class _Track:
    """One offloaded call, as both the waiting task and the worker see it.

    It holds the call's limiter slot (if any) and its timing. Two one-item lists
    settle the races between the task and the worker without a lock, since
    ``list.pop`` is atomic: whoever pops ``_start`` first owns the start (the worker
    runs the body, or the task drops it); whoever pops ``_end`` first is first at the
    end, and the other one finishes the job (the worker wakes the task or gives the
    slot back; the task gives the slot back itself).
    """

    __slots__ = ("_end", "_start", "ended", "limiter", "started", "waker")

    def __init__(self, limiter: anyio.CapacityLimiter | None) -> None:
        self.limiter = limiter
        self._start: list[None] = [None]
        self._end: list[None] = [None]
        self.started = 0.0
        self.ended = 0.0
        self.waker: Callable[[], object] | None = None

    async def acquire(self) -> None:
        limiter = self.limiter
        if limiter is None:
            return
        try:
            # No loop round trip when a slot is free (anyio checkpoints right after).
            limiter.acquire_on_behalf_of_nowait(self)
        except anyio.WouldBlock:
            await limiter.acquire_on_behalf_of(self)

    def release(self) -> None:
        if self.limiter is not None:
            with contextlib.suppress(Exception):
                self.limiter.release_on_behalf_of(self)

    def claim_start(self) -> bool:
        try:
            self._start.pop()
        except IndexError:
            return False
        return True

    def finish(self, *_: object) -> None:
        """The body has returned (any thread)."""
        try:
            self._end.pop()
        except IndexError:
            waker = self.waker  # the task left first, and left this behind
            if waker is not None:
                waker()

    def report(self, submitted: float, attributes: metrics.Attributes) -> None:
        if self.ended:
            metrics.record(metrics.OFFLOAD_WAIT_DURATION, self.started - submitted, attributes)
            metrics.record(metrics.OFFLOAD_RUN_DURATION, self.ended - self.started, attributes)

    async def stop_waiting(self, exc: BaseException, cancellable: bool) -> None:
        """The task stops waiting for a worker thread because of ``exc``."""
        if self.claim_start():
            self.release()  # the body never started, and now never will
            return
        if not cancellable and isinstance(exc, anyio.get_cancelled_exc_class()):
            # See the body through, whatever cancellation arrives meanwhile.
            done = anyio.Event()
            soon = _threadsafe_scheduler()
            self.waker = lambda: soon(done.set)
            if self._first_at_end():
                await _shielded_wait(done)
        self.leave()

    def leave(self) -> None:
        """Give the slot back now if the body has returned, else when it returns."""
        if self.limiter is None:
            return
        soon = _threadsafe_scheduler()
        self.waker = lambda: soon(self.release)
        if not self._first_at_end():
            self.release()

    def _first_at_end(self) -> bool:
        try:
            self._end.pop()
        except IndexError:
            return False
        return True


def _threadsafe_scheduler() -> Callable[[Callable[[], object]], None]:
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


async def _wait_future(future: concurrent.futures.Future[T], cancellable: bool) -> T:
    """Wait for an executor's future without blocking the loop, on any backend."""
    done = anyio.Event()
    soon = _threadsafe_scheduler()
    future.add_done_callback(lambda _: soon(done.set))
    try:
        await done.wait()
    except anyio.get_cancelled_exc_class():
        # Drop the job if it has not started; otherwise see it through, unless the
        # caller asked to be released at once.
        if not future.cancel() and not cancellable:
            await _shielded_wait(done)
        raise
    return future.result()


async def _shielded_wait(event: anyio.Event) -> None:
    with anyio.CancelScope(shield=True):
        while not event.is_set():
            try:
                await event.wait()
            except anyio.get_cancelled_exc_class():
                # Native asyncio cancellation (task.cancel(), wait_for) reaches
                # through a shield; the body is still running, so keep waiting.
                continue


async def _see_through(func: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
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


# -- worker processes and remote executors ---------------------------------------------


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process or remote executor."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class _ByReference:
    """A decorated function, sent by module and qualified name and unwrapped on arrival.

    ``pickle`` sends a function by name and checks that the name still leads to it,
    which fails for a decorated function: its name leads to the wrapper.
    """

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module = module
        self.qualname = qualname

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ByReference, (self.module, self.qualname))

    def resolve(self) -> Callable[..., Any]:
        module = sys.modules.get(self.module) or importlib.import_module(self.module)
        obj = _lookup(module, self.qualname)
        if obj is None:
            raise LookupError(f"{self.module}.{self.qualname} cannot be found in this process")
        return cast(Callable[..., Any], _unwrap(obj))


def _lookup(module: object, qualname: str) -> object:
    obj = module
    for part in qualname.split("."):
        space = getattr(obj, "__dict__", None)
        if isinstance(obj, type) and space is not None and part in space:
            obj = space[part]  # a staticmethod/classmethod object, not its binding
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _unwrap(obj: object) -> object:
    while True:
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        elif getattr(obj, _ATTR, None) is not None:
            obj = getattr(obj, "__wrapped__", obj)
        else:
            return obj


def _check_importable(func: object, name: str) -> None:
    qualname = getattr(func, "__qualname__", "")
    if isinstance(func, types.FunctionType) and ("<locals>" in qualname or "<lambda>" in qualname):
        raise TypeError(
            f"offload(process=True) cannot run {name} in a worker process: a worker "
            "finds a function by module and name, and this one is local (defined "
            "inside a function, or a lambda). Define it at the top level of a module."
        )


def _remote_reference(func: Callable[..., Any], *, main_by_value: bool) -> object:
    """What to send a worker so that it can call ``func``."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(func, types.FunctionType) or not module or not qualname:
        return func  # a bound method, a partial, a callable object: pickle decides
    if module == "__main__" and main_by_value:
        return func  # cloudpickle-style executors send __main__ functions by value
    found = sys.modules.get(module)
    obj = _lookup(found, qualname) if found is not None else None
    if obj is func:
        return func
    if obj is not None and _unwrap(obj) is func:
        return _ByReference(module, qualname)
    return func


def _call_remote(
    target: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bool, Any, str, float]:
    """Call in a worker; return ``(ok, result or exception, traceback text, run time)``."""
    start = perf_counter()
    try:
        func = target.resolve() if isinstance(target, _ByReference) else target
        result = cast(Callable[..., Any], func)(*args, **kwargs)
    except Exception as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return False, exc, text, perf_counter() - start
    return True, result, "", perf_counter() - start


def _process_entry(payload: bytes) -> bytes:
    # Runs in an anyio worker process. The reply is pickled here, not by anyio, so a
    # result that does not pickle becomes a clear error instead of a broken worker.
    try:
        target, args, kwargs = pickle.loads(payload)
        outcome = _call_remote(target, args, kwargs)
    except Exception as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        outcome = (False, exc, text, 0.0)
    try:
        return pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        ok, value, text, run = outcome
        if ok:
            error: Exception = pickle.PicklingError(
                f"the result ({type(value).__qualname__}) cannot be pickled to send it "
                f"back from the worker process: {type(exc).__name__}: {exc}"
            )
        else:
            error = RuntimeError(
                f"{type(value).__qualname__}: {value} (the exception itself cannot be pickled)"
            )
        return pickle.dumps((False, error, text, run), pickle.HIGHEST_PROTOCOL)


def _executor_entry(target: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Runs wherever the executor runs it (maybe another machine).
    return _call_remote(target, args, kwargs)


def _unpack(outcome: tuple[bool, Any, str, float], track: _Track) -> Any:
    ok, value, text, run = outcome
    track.ended = perf_counter()
    track.started = track.ended - run
    if ok:
        return value
    if text:
        value.__cause__ = _RemoteTraceback(text)
    raise value


def _pickling_error(
    name: str, target: object, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception
) -> pickle.PicklingError:
    what = f"{name} itself"
    for label, value in [
        *((f"argument {i + 1}", a) for i, a in enumerate(args)),
        *((f"argument {k}=", v) for k, v in kwargs.items()),
        ("the function", target),
    ]:
        try:
            pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception:
            what = label if label == "the function" else f"{label} ({type(value).__qualname__})"
            break
    return pickle.PicklingError(
        f"cannot send a call of {name} to a worker process: {what} cannot be pickled "
        f"({type(exc).__name__}: {exc}). Arguments and results of process=True "
        "functions must pickle; the function must be defined at the top level of a module."
    )


# -- yielding and checkpoint -------------------------------------------------------------


async def checkpoint() -> None:
    """Hand control back to the event loop once, and let a pending cancellation in.

    Other tasks and callbacks that are ready run before this returns. Works on
    asyncio, uvloop and trio.
    """
    await anyio.lowlevel.checkpoint()


@overload
def yielding(iterable: AsyncIterable[T], every: float = DEFAULT_BUDGET) -> AsyncIterator[T]: ...


@overload
def yielding(iterable: Iterable[T], every: float = DEFAULT_BUDGET) -> AsyncIterator[T]: ...


def yielding(
    iterable: Iterable[T] | AsyncIterable[T], every: float = DEFAULT_BUDGET
) -> AsyncIterator[T]:
    """Iterate with ``async for``, handing control back to the loop every ``every`` seconds.

    The budget counts all the time since the loop last had control: producing items
    and the body of your ``async for`` alike. When it is spent, the next step first
    awaits :func:`checkpoint` (which also lets cancellation in), then goes on. Cheap
    iterations pay one clock read per item.

    Args:
        iterable: Any iterable, or an async iterable that seldom awaits.
        every: The time budget in seconds (``0``: hand control back before every item).

    Returns:
        An async iterator over the same items.

    Raises:
        ValueError: ``every`` is negative or not a number.
    """
    if not isinstance(every, (int, float)) or not every >= 0:
        raise ValueError(f"yielding(every=...) takes seconds >= 0, not {every!r}")
    if isinstance(iterable, AsyncIterable):
        return _YieldingAsync(iterable, float(every))
    return _Yielding(iter(iterable), float(every))


# The two iterators repeat their few lines of pacing on purpose: __anext__ runs per
# item, and a shared helper method cost 20 % more per item in a timeit run.
class _Yielding(AsyncIterator[T], Generic[T]):
    __slots__ = ("_deadline", "_every", "_iterator")

    def __init__(self, iterator: Iterator[T], every: float) -> None:
        self._iterator = iterator
        self._every = every
        self._deadline: float | None = None

    async def __anext__(self) -> T:
        now = perf_counter()
        if self._deadline is None:
            self._deadline = now + self._every
        elif now >= self._deadline:
            await anyio.lowlevel.checkpoint()
            self._deadline = perf_counter() + self._every
        try:
            return next(self._iterator)
        except StopIteration:
            raise StopAsyncIteration from None


class _YieldingAsync(AsyncIterator[T], Generic[T]):
    __slots__ = ("_deadline", "_every", "_iterator")

    def __init__(self, iterable: AsyncIterable[T], every: float) -> None:
        self._iterator = aiter(iterable)
        self._every = every
        self._deadline: float | None = None

    async def __anext__(self) -> T:
        now = perf_counter()
        if self._deadline is None:
            self._deadline = now + self._every
        elif now >= self._deadline:
            await anyio.lowlevel.checkpoint()
            self._deadline = perf_counter() + self._every
        return await anext(self._iterator)
