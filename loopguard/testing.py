"""Helpers for your own tests: capture what the loop went through while code ran.

::

    from loopguard.testing import capture

    def test_handler_never_blocks():
        with capture(threshold=0.05) as seen:
            asyncio.run(handler())
        seen.assert_clean()  # fails naming the line that stalled or blocked

Under pytest, the plugin's ``loopguard_events`` fixture gives a test the same
:class:`LoopEvents` for everything that happened during it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from ._blocking import Allow, BlockingGuard, Mode
from ._watchdog import Config, Watchdog
from .events import BlockingCall, Event, Stall
from .sinks import CallbackSink, RecordingSink, format_blocking_call, format_stall

__all__ = ["LoopEvents", "capture", "settle"]


class LoopEvents(RecordingSink):
    """Stalls and blocking calls seen while some code ran, oldest first.

    A :class:`~loopguard.RecordingSink` (thread-safe: the watchdog's sampler adds
    stalls, loop threads add blocking calls) that keeps up to ``maxlen`` events and
    can fail a test with what it holds.

    Args:
        maxlen: How many events to keep; older ones are dropped and counted in
            :attr:`dropped` (and named by :meth:`assert_clean`).
    """

    def __init__(self, maxlen: int = 10_000) -> None:
        super().__init__(maxlen)

    def add(self, event: Event) -> None:
        """Record one event (a :class:`~loopguard.Stall` or :class:`~loopguard.BlockingCall`)."""
        self.emit(event)

    def take(self) -> list[Event]:
        """Return and forget everything recorded so far."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def assert_clean(self) -> None:
        """Fail with every stall and blocking call, described with its culprit line.

        Raises:
            AssertionError: Something was recorded.
        """
        events = self.events
        if events:
            more = f"\n(+{self.dropped} earlier events not kept)" if self.dropped else ""
            raise AssertionError(describe(events) + more)


def describe(events: Iterable[Event], *, full_stacks: bool = False) -> str:
    """Render stalls and blocking calls for a failure message, one block each.

    Args:
        events: The events to describe.
        full_stacks: Show every frame of each stack (by default, frames that are not
            the user's are folded around the culprit).
    """
    blocks = []
    for event in events:
        if isinstance(event, Stall):
            blocks.append(format_stall(event, full_stacks=full_stacks))
        elif isinstance(event, BlockingCall):
            blocks.append(format_blocking_call(event, full_stacks=full_stacks))
        else:
            blocks.append(str(event.to_dict()))
    return "\n".join(blocks)


def settle(wd: Watchdog, timeout: float = 1.0) -> bool:
    """Wait until the watchdog has reported stalls of loops that stopped running.

    A stall that ends with its loop stopping (the last callback of
    ``run_until_complete`` blocked) is reported by the sampler thread right after;
    call this before reading ``wd.stalls`` when the loop has just stopped.

    Args:
        wd: A running watchdog.
        timeout: Seconds to wait at most.

    Returns:
        False if the sampler still had work after ``timeout``.
    """
    return wd.flush(timeout)


@contextlib.contextmanager
def capture(
    threshold: float = 0.1,
    *,
    blocking: Mode = "record",
    allow: Iterable[str | Allow] = (),
) -> Iterator[LoopEvents]:
    """Record stalls and blocking calls of every loop that runs inside the block.

    Args:
        threshold: Seconds the loop must be held to count as a stall.
        blocking: Guard mode for blocking calls made on loop threads (``"record"``
            keeps them as events; ``"raise"`` refuses them; ``"off"`` ignores them).
        allow: Allow rules for the guard, on top of the defaults.

    Yields:
        The :class:`LoopEvents`, filled while the block runs (read it after).
    """
    seen = LoopEvents()
    wd = Watchdog(Config(threshold=threshold, log=False, record=0, sinks=(CallbackSink(seen.add),)))
    guard = BlockingGuard(blocking, allow=allow, listeners=[seen.add], rate_limit=None)
    wd.start()
    guard.start()
    try:
        yield seen
    finally:
        guard.stop()
        settle(wd)
        wd.stop()
