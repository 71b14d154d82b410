"""Event-loop metrics and statistics, read through the real OpenTelemetry SDK reader."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from helpers import collect, sleepy
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric

import loopguard

# These tests block event loops on purpose: the plugin must not fail them.
pytestmark = pytest.mark.loopguard(enabled=False)


def points(metric: Metric) -> list[Any]:
    return list(metric.data.data_points)


def test_delay_and_stall_metrics(reader: InMemoryMetricReader) -> None:
    async def main() -> None:
        await asyncio.sleep(0.2)
        sleepy(0.25)
        await asyncio.sleep(0.1)

    with loopguard.watch(threshold=0.1) as wd:
        asyncio.run(main())
        assert wd.flush()
        assert len(wd.stalls) == 1
    found = collect(reader)

    delay = found["asyncio.eventloop.delay"]
    assert delay.unit == "s"
    (point,) = points(delay)
    assert point.count >= 10  # one per heartbeat
    assert point.max >= 0.2  # the stall showed as heartbeat lateness
    assert 0.1 in point.explicit_bounds and 1.0 in point.explicit_bounds  # seconds-scale

    (stalls,) = points(found["asyncio.eventloop.stall.count"])
    assert stalls.value == 1
    assert dict(stalls.attributes) == {"asyncio.eventloop.stall.cause": "blocked"}
    assert found["asyncio.eventloop.stall.count"].unit == "{stall}"

    (duration,) = points(found["asyncio.eventloop.stall.duration"])
    assert duration.count == 1
    assert abs(duration.sum - 0.25) < 0.1


def test_loop_statistics_metrics_while_running(reader: InMemoryMetricReader) -> None:
    seen: dict[str, Metric] = {}

    async def main() -> None:
        await asyncio.sleep(0.1)
        background = [asyncio.create_task(asyncio.sleep(1)) for _ in range(5)]
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # busy, in short callbacks
            time.sleep(0.005)
            await asyncio.sleep(0)
        seen.update(collect(reader))
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)

    with loopguard.watch(threshold=0.1, stats=True):
        asyncio.run(main())

    (util,) = points(seen["asyncio.eventloop.utilization"])
    assert seen["asyncio.eventloop.utilization"].unit == "1"
    assert 0.5 < util.value <= 1.0
    time_points = points(seen["asyncio.eventloop.time"])
    by_state = {p.attributes["asyncio.eventloop.state"]: p.value for p in time_points}
    assert set(by_state) == {"active", "idle"}
    assert by_state["active"] > 0.2
    (tasks,) = points(seen["asyncio.eventloop.task.count"])
    assert tasks.value >= 6  # main + 5 background
    assert "asyncio.eventloop.callback.pending" in seen


def test_stats_api_busy_vs_idle_and_restores_selector() -> None:
    results: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wd = loopguard.current()
        assert wd is not None
        wd.stats()  # reset
        await asyncio.sleep(0.3)
        (results["idle"],) = wd.stats()
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            time.sleep(0.01)
            await asyncio.sleep(0)
        (results["busy"],) = wd.stats()
        results["selector"] = loop._selector  # type: ignore[attr-defined]

    loopguard.install(threshold=0.1, stats=True, log=False)
    asyncio.run(main())
    idle, busy = results["idle"], results["busy"]
    assert idle.utilization < 0.2
    assert busy.utilization > 0.8
    assert busy.iterations > 10
    assert busy.max_iteration >= 0.009
    assert idle.loop == "asyncio" and idle.tasks == 1
    assert "select" not in vars(results["selector"])  # the wrapper is gone with the loop


def test_uvloop_and_trio_report_what_they_can() -> None:
    import anyio
    import uvloop

    got: dict[str, Any] = {}

    async def probe(name: str) -> None:
        await anyio.sleep(0.1)
        wd = loopguard.current()
        assert wd is not None
        (got[name],) = wd.stats()

    loopguard.install(threshold=0.1, stats=True, log=False)
    uvloop.run(probe("uvloop"))
    anyio.run(probe, "trio", backend="trio")
    assert got["uvloop"].utilization is None and got["uvloop"].tasks == 1
    assert got["trio"].utilization is None
    assert got["trio"].tasks is not None and got["trio"].tasks >= 1


def test_stats_are_off_by_default() -> None:
    async def main() -> Any:
        wd = loopguard.install(log=False)
        await asyncio.sleep(0.05)
        return wd.stats(), vars(asyncio.get_running_loop()._selector)  # type: ignore[attr-defined]

    stats, selector_vars = asyncio.run(main())
    assert stats == []
    assert "select" not in selector_vars


def test_delay_metric_continues_when_the_first_of_two_watchdogs_stops(
    reader: InMemoryMetricReader,
) -> None:
    """The loop-delay metric is one watchdog's duty per loop, and passes on when it stops."""
    first = loopguard.watch(threshold=0.1).start()
    second = loopguard.watch(threshold=0.1).start()

    def heartbeats() -> int:
        found = collect(reader)
        metric = found.get("asyncio.eventloop.delay")
        return sum(p.count for p in points(metric)) if metric is not None else 0

    async def main() -> tuple[int, int]:
        await asyncio.sleep(0.2)
        first.stop()
        before = heartbeats()
        await asyncio.sleep(0.3)  # ~15 heartbeats of the remaining watchdog
        return before, heartbeats()

    try:
        before, after = asyncio.run(main())
    finally:
        first.stop()
        second.stop()
    assert before >= 5
    assert after - before >= 5, (before, after)
