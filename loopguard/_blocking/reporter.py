"""The reporter thread: events reach the sinks off the loop thread.

Sinks may write files or log; the loop thread only queues each event for them. One
daemon thread, started on the first event (again after a fork), hands the events
over in order; :meth:`_Reporter.flush` waits until those queued so far are done.
"""

from __future__ import annotations

import _thread
import logging
import threading
from typing import Any

from ..events import BlockingCall
from ..sinks import Sink

logger = logging.getLogger("loopguard")


class _Reporter:
    """Hands events to sinks on a thread of its own, so sinks never run on the loop."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """Start afresh: no queue, thread or lock another thread held at a fork."""
        import queue

        self._queue: queue.SimpleQueue[tuple[Sink, Any] | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = _thread.allocate_lock()

    def put(self, sink: Sink, event: BlockingCall) -> None:
        self._queue.put((sink, event))
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=self._main, name="loopguard-reporter", daemon=True
            )
            self._thread.start()

    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            sink, event = item
            try:
                sink.emit(event)
            except Exception:
                logger.exception("loopguard could not report a blocking call")

    def flush(self, timeout: float) -> bool:
        thread = self._thread
        if thread is None or not thread.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)


_reporter = _Reporter()


def _after_fork_in_child() -> None:
    _reporter._reset()  # the thread did not survive the fork; its queue and lock may not
