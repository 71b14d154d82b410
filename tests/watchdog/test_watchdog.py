"""The watchdog finds stalls, names the culprit line, and measures the duration."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from typing import Any

import pytest
from helpers import SLEEPY_LINE, SPIN_LINES, sleepy, spin

import loopguard
from loopguard import Stall

# These tests block event loops on purpose: the plugin must not fail them.
pytestmark = pytest.mark.loopguard(enabled=False)

THRESHOLD = 0.1
INTERVAL = 0.02
# Generous slack on top of the one-interval error bound: CI machines are shared.
SLACK = 0.06


def run_on(loop_kind: str, coro_fn: Any) -> None:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(coro_fn())
    else:
        asyncio.run(coro_fn())


def stalls_of(wd: loopguard.Watchdog, timeout: float = 2.0) -> list[Stall]:
    """The stalls, once some were reported and no more came for a moment (or at timeout).

    A loop in another thread may not even have started its stall yet, so this polls
    for the first one, flushing what the sampler holds at each look.
    """
    deadline = time.monotonic() + timeout
    last: list[Stall] = []
    while time.monotonic() < deadline:
        wd.flush(0.05)
        last = wd.stalls
        time.sleep(0.05)
        if last and last == wd.stalls:
            break
    return last


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize(
    ("blocker", "lines", "function"),
    [(sleepy, {SLEEPY_LINE}, "sleepy"), (spin, SPIN_LINES, "spin")],
    ids=["gil-releasing-sleep", "pure-python"],
)
def test_stall_names_culprit_line_and_duration(
    loop_kind: str, blocker: Any, lines: set[int], function: str
) -> None:
    async def main() -> None:
        await asyncio.sleep(0.05)
        blocker(0.3)
        await asyncio.sleep(0.05)

    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
        began = time.time()
        run_on(loop_kind, main)
        stalls = stalls_of(wd)
    assert len(stalls) == 1, stalls
    stall = stalls[0]
    assert stall.culprit is not None
    assert stall.culprit.function == function
    assert stall.culprit.line in lines
    assert stall.culprit.file.endswith("helpers.py")
    assert abs(stall.duration - 0.3) <= INTERVAL + SLACK
    assert stall.cause == "blocked"
    assert stall.loop == loop_kind
    assert stall.task == "Task-1" or (stall.task or "").startswith("Task-")
    assert stall.samples >= 5
    assert sum(s.count for s in stall.stacks) <= stall.samples
    # It began after the first 50 ms sleep, give or take a heartbeat period.
    assert began + 0.05 - INTERVAL - SLACK <= stall.started_at <= began + 0.05 + INTERVAL + SLACK


def test_trio_through_anyio() -> None:
    anyio = pytest.importorskip("anyio")
    pytest.importorskip("trio")

    async def main() -> None:
        await anyio.sleep(0.05)
        sleepy(0.3)
        await anyio.sleep(0.05)

    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
        anyio.run(main, backend="trio")
        stalls = stalls_of(wd)
    assert [s.loop for s in stalls] == ["trio"]
    assert stalls[0].culprit is not None
    assert stalls[0].culprit.line == SLEEPY_LINE
    assert abs(stalls[0].duration - 0.3) <= INTERVAL + SLACK


def test_new_event_loop_run_until_complete_and_restart() -> None:
    async def block() -> None:
        sleepy(0.25)

    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(block())
            loop.run_until_complete(asyncio.sleep(0.05))  # restarted: watched again
            loop.run_until_complete(block())
        finally:
            loop.close()
        stalls = stalls_of(wd)
    assert len(stalls) == 2
    assert all(s.culprit is not None and s.culprit.line == SLEEPY_LINE for s in stalls)


def test_install_inside_running_loop_watches_it() -> None:
    async def main() -> loopguard.Watchdog:
        wd = loopguard.install(threshold=THRESHOLD, interval=INTERVAL, log=False)
        await asyncio.sleep(0.05)
        sleepy(0.25)
        await asyncio.sleep(0.05)
        return wd

    wd = asyncio.run(main())
    # A loaded machine (or install() starting up inside the loop) may add a short stall
    # of its own: the sleep is reported once, at its line.
    stalls = [s for s in stalls_of(wd) if s.culprit is not None and s.culprit.line == SLEEPY_LINE]
    assert len(stalls) == 1, stalls_of(wd)


def test_loop_already_running_in_another_thread() -> None:
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        loop.call_soon(ready.set)
        loop.run_forever()

    thread = threading.Thread(target=serve, name="server-loop")
    thread.start()
    try:
        ready.wait(5)
        with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
            time.sleep(0.1)  # let the attach reach the loop thread
            loop.call_soon_threadsafe(sleepy, 0.3)
            stalls = stalls_of(wd, timeout=3)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    assert len(stalls) == 1
    assert stalls[0].thread == "server-loop"
    assert stalls[0].culprit is not None
    assert stalls[0].culprit.line == SLEEPY_LINE


def test_several_loops_in_several_threads() -> None:
    def worker(seconds: float) -> None:
        async def main() -> None:
            await asyncio.sleep(0.05)
            sleepy(seconds)
            await asyncio.sleep(0.05)

        asyncio.run(main())

    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
        threads = [
            threading.Thread(target=worker, args=(s,), name=f"loop-{i}")
            for i, s in enumerate((0.2, 0.4, 0.3))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stalls = stalls_of(wd)
    by_thread = {s.thread: s for s in stalls}
    assert set(by_thread) == {"loop-0", "loop-1", "loop-2"}
    for i, seconds in enumerate((0.2, 0.4, 0.3)):
        assert abs(by_thread[f"loop-{i}"].duration - seconds) <= INTERVAL + SLACK


def test_healthy_busy_loop_reports_nothing() -> None:
    async def chatter() -> None:
        for _ in range(2000):
            await asyncio.sleep(0)

    async def main() -> None:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            await asyncio.gather(*(chatter() for _ in range(20)))

    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
        asyncio.run(main())
        time.sleep(0.1)
    assert wd.stalls == []
    delay = wd.delay()
    assert delay.count > 50  # the heartbeat ran all along
    assert delay.max < THRESHOLD


def test_idle_time_between_runs_is_not_a_stall() -> None:
    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
        asyncio.run(asyncio.sleep(0.05))
        time.sleep(0.4)  # no loop is running: nothing is held
        asyncio.run(asyncio.sleep(0.05))
        time.sleep(0.1)
    assert wd.stalls == []


def test_stopped_loop_that_was_joined_while_running_is_not_a_stall() -> None:
    async def main() -> None:
        loopguard.install(threshold=THRESHOLD, interval=INTERVAL, log=False)
        await asyncio.sleep(0.05)
        asyncio.get_running_loop().stop()

    # The loop was joined from inside (no run_forever wrapper around it) and stops.
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(main())
        loop.run_forever()
        stopped = time.time()
        assert task.done()
        wd = loopguard.current()
        assert wd is not None
        time.sleep(0.4)
        # Nothing is reported for the time the stopped loop did not tick.
        assert [s for s in wd.stalls if s.started_at + s.duration > stopped] == []
    finally:
        loop.close()


def test_uninstall_restores_exactly_what_was_replaced() -> None:
    import trio
    import uvloop

    originals = (
        asyncio.BaseEventLoop.__dict__["run_forever"],
        "run_forever" in uvloop.Loop.__dict__,
        trio.run,
    )
    meta_path = list(__import__("sys").meta_path)
    loopguard.install(log=False)
    assert asyncio.BaseEventLoop.__dict__["run_forever"] is not originals[0]
    assert trio.run is not originals[2]
    loopguard.uninstall()
    assert asyncio.BaseEventLoop.__dict__["run_forever"] is originals[0]
    assert ("run_forever" in uvloop.Loop.__dict__) is originals[1]
    assert trio.run is originals[2]
    assert __import__("sys").meta_path == meta_path


def test_uninstall_leaves_a_later_wrapper_working() -> None:
    loopguard.install(log=False)
    ours = asyncio.BaseEventLoop.__dict__["run_forever"]
    calls: list[str] = []

    def theirs(self: asyncio.BaseEventLoop) -> None:
        calls.append("theirs")
        ours(self)

    asyncio.BaseEventLoop.run_forever = theirs  # type: ignore[method-assign]
    try:
        loopguard.uninstall()
        assert asyncio.BaseEventLoop.__dict__["run_forever"] is theirs
        assert asyncio.run(asyncio.sleep(0, "ok")) == "ok"
        assert calls
    finally:
        asyncio.BaseEventLoop.run_forever = ours.__wrapped__  # type: ignore[method-assign]


def test_sink_that_raises_is_disabled_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def bad(event: loopguard.Event) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("sink exploded")

    async def main() -> None:
        for _ in range(2):
            sleepy(0.2)
            await asyncio.sleep(0.05)

    with (
        caplog.at_level(logging.ERROR, "loopguard"),
        loopguard.watch(threshold=THRESHOLD, interval=INTERVAL, callback=bad) as wd,
    ):
        asyncio.run(main())  # the user's program never sees the sink's error
        stalls = stalls_of(wd)
    assert len(stalls) == 2
    assert calls == 1
    errors = [r for r in caplog.records if "disabled" in r.getMessage()]
    assert len(errors) == 1


def test_events_hold_no_frames_or_locals() -> None:
    class Secret:
        pass

    async def main() -> None:
        secret = Secret()
        sleepy(0.2)
        del secret

    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
        asyncio.run(main())
        stalls = stalls_of(wd)
    assert stalls
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, Secret)]
    for frame in stalls[0].stacks[0].frames:
        assert set(vars(frame)) == {"file", "line", "function"}


def test_json_lines_sink_writes_one_object_per_stall(tmp_path: Any) -> None:
    import json

    path = tmp_path / "events.jsonl"

    async def main() -> None:
        sleepy(0.2)

    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL, json=path) as wd:
        asyncio.run(main())
        stalls_of(wd)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert record["kind"] == "stall"
    assert record["culprit"]["line"] == SLEEPY_LINE
    assert record["stacks"][0]["frames"][-1]["function"] in ("sleepy", "main")


def test_ten_thousand_stalls_keep_memory_bounded() -> None:
    from loopguard import Frame

    wd = loopguard.watch(record=100, log=True)
    wd.start()
    logger = logging.getLogger("loopguard")
    logger.disabled = True
    try:
        for i in range(10_000):
            culprit = Frame(f"app{i}.py", i, "handler")
            wd.sinks.emit(Stall(time.time(), 0.2, "blocked", "Task-1", culprit))
    finally:
        logger.disabled = False
        wd.stop()
    assert len(wd.stalls) == 100
    assert len(wd.summary.rows()) <= wd.summary.max_culprits + 1
    logging_sink = next(s for s in wd.sinks.sinks if isinstance(s, loopguard.LoggingSink))
    assert len(logging_sink._seen) <= logging_sink.max_culprits


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_rearms() -> None:
    import json
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()

    def child() -> None:
        async def main() -> None:
            sleepy(0.25)

        asyncio.run(main())
        time.sleep(0.2)
        current = loopguard.current()
        found = current.stalls if current else []
        queue.put(json.dumps([s.to_dict() for s in found]))

    loopguard.install(threshold=THRESHOLD, interval=INTERVAL, log=False)
    asyncio.run(asyncio.sleep(0.05))
    proc = ctx.Process(target=child)
    proc.start()
    proc.join(20)
    stalls = json.loads(queue.get())
    assert proc.exitcode == 0
    assert len(stalls) == 1
    assert stalls[0]["culprit"]["line"] == SLEEPY_LINE


def test_stall_that_ends_as_the_watch_ends_is_reported() -> None:
    async def main() -> None:
        sleepy(0.2)  # the loop finishes right after: no heartbeat runs again

    for _ in range(5):
        with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
            asyncio.run(main())
        assert len(wd.stalls) == 1  # read at once, no waiting: stop() took a last look
        assert wd.stalls[0].culprit is not None
        assert wd.stalls[0].culprit.line == SLEEPY_LINE


def test_a_dead_weakref_proxy_does_not_stop_a_watchdog_from_starting() -> None:
    """Looking for loops among all objects must survive a proxy whose object died."""
    import weakref

    class Gone:
        pass

    obj = Gone()
    proxies = [weakref.proxy(obj)]
    del obj
    with loopguard.watch() as wd:
        assert wd.running
    assert proxies


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_loop_already_running_in_another_thread_is_found(loop_kind: str) -> None:
    """watch() started after a thread's loop is running finds it (from its stack)."""
    watching = threading.Event()
    running = threading.Event()

    async def main() -> None:
        running.set()
        while not watching.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the watchdog attaches from this loop's own thread
        sleepy(0.3)
        await asyncio.sleep(0.05)

    thread = threading.Thread(target=run_on, args=(loop_kind, main), name="loop-thread")
    thread.start()
    assert running.wait(10)
    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL, log=False) as wd:
        watching.set()
        thread.join(10)
        stalls = stalls_of(wd)
    found = [s for s in stalls if s.culprit is not None and s.culprit.line == SLEEPY_LINE]
    assert found and found[0].thread == "loop-thread", stalls
