"""The ``@offload`` decorator: its options, their validation, and building the wrapper.

It owns the public :func:`offload`, checking that the decorated function is
synchronous, and assembling the wrapper from a :class:`~.runners.Runner` (the
offloaded call) and, with ``adaptive=``, the inline fast path of :mod:`.adaptive`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import math
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, overload

import anyio

from .adaptive import inline_while_fast
from .common import DEFAULT_BUDGET, WRAPPER_ATTR, Mode, qualified_name
from .limits import Limit
from .runners import Runner

__all__ = ["offload"]

P = ParamSpec("P")
R = TypeVar("R")


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


# Long only for its docstring, the reference of every option; the body is four lines.
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

    * default: a worker thread (on asyncio and uvloop loopguard's own, as cheap per
      call as ``asyncio.to_thread``; on trio trio's). Context variables of the
      caller are visible in the body; an exception keeps its traceback; the body may
      call ``anyio.from_thread.run()``. Calls without a ``limit`` share anyio's
      default thread limiter (40 at once).
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
        name_in_metrics: Add a ``loopguard.offload.function`` attribute to this function's metrics:
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
    runner = Runner(
        func,
        mode=options.mode,
        executor=options.executor,
        limit=options.limit,
        cancellable=options.cancellable,
        name_in_metrics=options.name_in_metrics,
    )
    call = runner.call

    if options.budget is not None:
        wrapper = inline_while_fast(runner, options.budget)
    elif runner.mode == "thread":
        wrapper = call  # a fresh function: the decorated function itself
    else:

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await call(*args, **kwargs)

    functools.update_wrapper(wrapper, func)
    setattr(wrapper, WRAPPER_ATTR, runner)
    return wrapper


def _check_sync(func: object) -> None:
    if not callable(func):
        raise TypeError(f"offload() needs a function, not {type(func).__name__}")
    name = qualified_name(func)
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
