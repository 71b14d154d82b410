"""Adaptive offload: run a function inline while it is fast, offload it once it is not.

It owns the inline fast path of ``offload(adaptive=...)``, the one-time switch to the
function's :class:`~.runners.Runner` once a call exceeds its budget, and reporting
that switch: an :class:`~loopguard.events.Offloaded` event to every running
watchdog's sinks, and a warning on the ``loopguard.offload`` logger when no
watchdog logs it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import types
from collections.abc import Callable, Coroutine
from time import perf_counter
from typing import Any, cast

import anyio

from .._watchdog import running
from ..events import Frame, Offloaded
from .runners import Runner

__all__ = ["inline_while_fast"]

logger = logging.getLogger("loopguard.offload")


def inline_while_fast(runner: Runner, budget: float) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Make the coroutine function that calls ``runner.func`` inline until it is slow.

    Args:
        runner: The function's runner, for the calls once it has moved off the loop.
        budget: Seconds one inline call may take before every later call is offloaded.

    Returns:
        The coroutine function to wrap: inline calls cost two clock reads, not a
        thread hop.
    """
    switch = _Switch(runner, budget)
    func = runner.func
    call = runner.call
    clock = perf_counter  # a closure variable is read faster than a global

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if switch.inline:
            # The fast path: no thread hop, two clock reads.
            start = clock()
            try:
                return func(*args, **kwargs)
            finally:
                elapsed = clock() - start
                if elapsed > budget:
                    switch.move_out(elapsed)
        return await call(*args, **kwargs)

    return wrapper


class _Switch:
    """Whether one adaptive function still runs inline, and its one move off the loop."""

    def __init__(self, runner: Runner, budget: float) -> None:
        self.inline = True
        self._runner = runner
        self._budget = budget
        self._lock = threading.Lock()

    def move_out(self, elapsed: float) -> None:
        """Switch from inline to offloaded after a call took ``elapsed`` seconds."""
        with self._lock:
            if not self.inline:
                return
            self.inline = False
        runner = self._runner
        try:
            _report(
                Offloaded(
                    function=runner.name,
                    duration=elapsed,
                    budget=self._budget,
                    mode=runner.mode,
                    definition=_definition(runner.func),
                    task=_task_name(),
                )
            )
        except Exception:
            with contextlib.suppress(Exception):
                logger.exception(
                    "loopguard could not report that %s moved off the loop", runner.name
                )


def _definition(func: object) -> Frame | None:
    code = getattr(inspect.unwrap(cast(Any, func)), "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    return Frame(code.co_filename, code.co_firstlineno, code.co_name)


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
