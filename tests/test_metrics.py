"""The metric table and the offload metrics, end to end through the OpenTelemetry SDK."""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import collect
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
)

import loopguard
from loopguard import metrics

pytestmark = pytest.mark.anyio


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    # Made and shut down outside the event loop: shutting down joins its threads.
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        yield executor


def histogram_points(metric: Metric) -> list[HistogramDataPoint]:
    points = list(metric.data.data_points)
    assert all(isinstance(p, HistogramDataPoint) for p in points)
    return points  # type: ignore[return-value]


def number_points(metric: Metric) -> list[NumberDataPoint]:
    points = list(metric.data.data_points)
    assert all(isinstance(p, NumberDataPoint) for p in points)
    return points  # type: ignore[return-value]


def active_calls(reader: InMemoryMetricReader, mode: str, function: str) -> float | None:
    """The observed number of active calls with exactly this mode and function."""
    attributes = {metrics.OFFLOAD_MODE: mode, metrics.OFFLOAD_FUNCTION: function}
    metric = collect(reader).get(metrics.OFFLOAD_ACTIVE)
    if metric is None:
        return None
    for point in number_points(metric):
        if dict(point.attributes or {}) == attributes:
            return point.value
    return None


# -- the table ---------------------------------------------------------------------------


DESIGN_TABLE = {
    "asyncio.eventloop.delay": ("histogram", "s"),
    "asyncio.eventloop.utilization": ("gauge", "1"),
    "asyncio.eventloop.time": ("counter", "s"),
    "asyncio.eventloop.stall.count": ("counter", "{stall}"),
    "asyncio.eventloop.stall.duration": ("histogram", "s"),
    "asyncio.eventloop.slow_callback.count": ("counter", "{callback}"),
    "asyncio.eventloop.callback.pending": ("gauge", "{callback}"),
    "asyncio.eventloop.task.count": ("gauge", "{task}"),
    "asyncio.blocking_call.count": ("counter", "{call}"),
    "loopguard.offload.wait.duration": ("histogram", "s"),
    "loopguard.offload.run.duration": ("histogram", "s"),
    "loopguard.offload.active": ("updowncounter", "{call}"),
    "websocket.receive.queue.size": ("updowncounter", "{message}"),
    "websocket.receive.queue.capacity": ("updowncounter", "{message}"),
    "websocket.receive.time_in_queue": ("histogram", "s"),
    "websocket.receive.message.count": ("counter", "{message}"),
    "websocket.receive.lag": ("gauge", "s"),
    "websocket.process.duration": ("histogram", "s"),
    "websocket.connection.active": ("updowncounter", "{connection}"),
    "websocket.ping.duration": ("histogram", "s"),
    "websocket.close.count": ("counter", "{connection}"),
    "loopguard.asgi.shed.count": ("counter", "{request}"),
    "broadcast.subscriber.count": ("updowncounter", "{subscriber}"),
    "broadcast.group.member.count": ("updowncounter", "{connection}"),
    "broadcast.queue.size": ("updowncounter", "{message}"),
    "broadcast.message.count": ("counter", "{message}"),
    "broadcast.eviction.count": ("counter", "{eviction}"),
    "broadcast.fanout.duration": ("histogram", "s"),
    "broadcast.backplane.lag": ("histogram", "s"),
    "broadcast.backplane.reconnect.count": ("counter", "{reconnect}"),
    "broadcast.backplane.error.count": ("counter", "{error}"),
    "broadcast.backplane.lost.count": ("counter", "{message}"),
}


def test_the_table_has_every_designed_metric() -> None:
    assert {name: (s.kind, s.unit) for name, s in metrics.SPECS.items()} == DESIGN_TABLE
    for name, spec in metrics.SPECS.items():
        assert spec.name == name
        assert spec.description.endswith(".")
        assert (spec.buckets is not None) == (spec.kind == "histogram"), name
        if spec.buckets is not None:
            assert list(spec.buckets) == sorted(set(spec.buckets))
    constants = {getattr(metrics, n) for n in metrics.__all__ if n.isupper() and n not in {"SPECS"}}
    keys = {key for spec in metrics.SPECS.values() for key in spec.attributes}
    assert constants - {metrics.METER_NAME} - keys == set(metrics.SPECS)


# The names settled before 1.0.
SETTLED = list(metrics.SPECS)
# Registered OpenTelemetry attributes, used as they are (not under the metric's name).
REGISTERED = {"http.route", "error.type"}


@pytest.mark.parametrize("name", SETTLED)
def test_names_follow_the_opentelemetry_naming_rules(name: str) -> None:
    spec = metrics.SPECS[name]
    # Attributes live under the metric's namespace; no plural or _total names.
    for key in set(spec.attributes) - REGISTERED:
        namespace = key.rsplit(".", 1)[0]
        assert namespace.count(".") >= 1 and name.startswith(f"{namespace}."), key
    assert not name.endswith(("s", "_total")), name
    if spec.kind == "updowncounter":  # a queue's .size/.capacity: OpenTelemetry's own shape
        assert name.endswith((".count", ".active", ".queue.size", ".queue.capacity")), name


def test_only_the_metrics_module_names_a_metric() -> None:
    package = Path(loopguard.__file__).parent
    pattern = re.compile("|".join(re.escape(f'"{name}"') for name in metrics.SPECS))
    offenders = [
        path.name
        for path in package.rglob("*.py")
        if path.name != "metrics.py" and pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_unknown_names_are_programming_errors() -> None:
    with pytest.raises(KeyError, match="not a loopguard metric"):
        metrics.instrument("asyncio.eventloop.nope")
    with pytest.raises(ValueError, match="histogram"):
        metrics.observe(metrics.EVENTLOOP_DELAY, lambda: [])


# -- offload metrics end to end ------------------------------------------------------------


def _sleep_then_maybe_fail(seconds: float, fail: bool = False) -> None:
    time.sleep(seconds)
    if fail:
        raise RuntimeError("failed on purpose")


async def test_offload_wait_run_and_active(
    anyio_backend: object, reader: InMemoryMetricReader
) -> None:
    limited = loopguard.offload(limit=1, name_in_metrics="e2e")(_sleep_then_maybe_fail)
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(limited, 0.05)
    with pytest.raises(RuntimeError):
        await limited(0.01, True)

    # (A watchdog running meanwhile may add its own asyncio.eventloop.* metrics.)
    found = {n: m for n, m in collect(reader).items() if n.startswith("loopguard.")}
    assert set(found) == {
        metrics.OFFLOAD_ACTIVE,
        metrics.OFFLOAD_WAIT_DURATION,
        metrics.OFFLOAD_RUN_DURATION,
    }
    [run] = histogram_points(found[metrics.OFFLOAD_RUN_DURATION])
    [wait] = histogram_points(found[metrics.OFFLOAD_WAIT_DURATION])
    assert run.count == wait.count == 4  # the failed call counts too
    assert 0.16 <= run.sum < 1.0
    # limit=1: the three calls queue, the second waits ~50 ms, the third ~100 ms.
    assert wait.max >= 0.09
    assert 0.14 <= wait.sum < 1.0
    expected = {"loopguard.offload.mode": "thread", "loopguard.offload.function": "e2e"}
    assert active_calls(reader, "thread", "e2e") == 0
    assert dict(run.attributes or {}) == dict(wait.attributes or {}) == expected
    assert tuple(run.explicit_bounds) == metrics.SPECS[metrics.OFFLOAD_RUN_DURATION].buckets
    assert found[metrics.OFFLOAD_RUN_DURATION].unit == "s"
    assert found[metrics.OFFLOAD_ACTIVE].unit == "{call}"


async def test_active_counts_calls_in_progress(
    anyio_backend: object, reader: InMemoryMetricReader
) -> None:
    release = threading.Event()
    started = threading.Semaphore(0)

    def held() -> None:
        started.release()
        release.wait(10)

    call = loopguard.offload(name_in_metrics="held")(held)
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(call)
        for _ in range(3):
            await anyio.to_thread.run_sync(started.acquire)
        assert active_calls(reader, mode="thread", function="held") == 3
        release.set()
    assert active_calls(reader, mode="thread", function="held") == 0


async def test_function_name_only_when_asked(
    anyio_backend: object,
    reader: InMemoryMetricReader,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    await loopguard.offload(_sleep_then_maybe_fail)(0)
    await loopguard.offload(name_in_metrics=True)(_sleep_then_maybe_fail)(0)
    await loopguard.offload(name_in_metrics="nap")(_sleep_then_maybe_fail)(0)
    await loopguard.offload(executor=pool)(_sleep_then_maybe_fail)(0)

    points = histogram_points(collect(reader)[metrics.OFFLOAD_RUN_DURATION])
    seen = sorted(tuple(sorted(dict(p.attributes or {}).items())) for p in points)
    assert seen == [
        (("loopguard.offload.function", "nap"), ("loopguard.offload.mode", "thread")),
        (
            ("loopguard.offload.function", f"{__name__}._sleep_then_maybe_fail"),
            ("loopguard.offload.mode", "thread"),
        ),
        (("loopguard.offload.mode", "executor"),),
        (("loopguard.offload.mode", "thread"),),
    ]
    for name, metric in collect(reader).items():
        allowed = set(metrics.SPECS[name].attributes)
        for point in metric.data.data_points:
            assert set(dict(point.attributes or {})) <= allowed, name


async def test_failed_lookups_leave_no_active_call(
    anyio_backend: object, reader: InMemoryMetricReader
) -> None:
    unsized = loopguard.offload(limit="metrics-unsized", name_in_metrics="unsized")(time.sleep)
    with pytest.raises(LookupError):
        await unsized(0)
    assert active_calls(reader, mode="thread", function="unsized") in (None, 0)


async def test_inline_adaptive_calls_record_nothing(
    anyio_backend: object, reader: InMemoryMetricReader
) -> None:
    adaptive = loopguard.offload(adaptive=1.0, name_in_metrics="inline")(_sleep_then_maybe_fail)
    for _ in range(5):
        await adaptive(0)
    found = collect(reader)
    assert metrics.OFFLOAD_RUN_DURATION not in found
    assert metrics.OFFLOAD_WAIT_DURATION not in found
    assert active_calls(reader, mode="thread", function="inline") in (None, 0)


@loopguard.offload(process=True)
def cube_in_process(x: int) -> int:
    return x**3


async def test_process_mode_metrics(anyio_backend: object, reader: InMemoryMetricReader) -> None:
    with anyio.fail_after(60):
        assert await cube_in_process(3) == 27
    found = collect(reader)
    [run] = histogram_points(found[metrics.OFFLOAD_RUN_DURATION])
    [wait] = histogram_points(found[metrics.OFFLOAD_WAIT_DURATION])
    assert dict(run.attributes or {}) == {"loopguard.offload.mode": "process"}
    assert run.count == wait.count == 1
    assert 0 <= run.sum < wait.sum  # starting a worker process is the waiting


# -- never raising, observing, switching providers -----------------------------------------


class _Broken:
    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"broken {name}")


def test_a_failing_meter_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    metrics.use_meter_provider(None)
    monkeypatch.setattr(metrics, "_get_meter", _Broken)
    try:
        for _ in range(3):
            metrics.record(metrics.OFFLOAD_ACTIVE, 1, {metrics.OFFLOAD_MODE: "thread"})
        metrics.observe(metrics.EVENTLOOP_TASKS, lambda: [])
    finally:
        monkeypatch.undo()
        metrics.observe(metrics.EVENTLOOP_TASKS, None)
        metrics.use_meter_provider(None)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        f"loopguard metric {metrics.OFFLOAD_ACTIVE} could not be created",
        f"loopguard metric {metrics.EVENTLOOP_TASKS} could not be observed",
    ]


def test_a_failing_instrument_is_disabled_and_logged_once(
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    def explode(*args: object) -> None:
        calls.append(args)
        raise RuntimeError("exporter bug")

    histogram = metrics.instrument(metrics.OFFLOAD_RUN_DURATION)
    monkeypatch.setattr(histogram, "record", explode)
    for _ in range(3):
        metrics.record(metrics.OFFLOAD_RUN_DURATION, 0.1)
    assert len(calls) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"loopguard metric {metrics.OFFLOAD_RUN_DURATION} raised; it is disabled"
    ]


def test_observe_replaces_and_survives_a_provider_change(
    reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Iterable[tuple[float, None]]:
        raise RuntimeError("callback bug")

    try:
        metrics.observe(metrics.EVENTLOOP_TASKS, lambda: [(3, None)])
        metrics.observe(metrics.EVENTLOOP_TASKS, lambda: [(7, None)])
        [point] = number_points(collect(reader)[metrics.EVENTLOOP_TASKS])
        assert point.value == 7

        second = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[second])
        metrics.use_meter_provider(provider)
        [point] = number_points(collect(second)[metrics.EVENTLOOP_TASKS])
        assert point.value == 7

        metrics.observe(metrics.EVENTLOOP_TASKS, broken)
        assert metrics.EVENTLOOP_TASKS not in collect(second)
        assert metrics.EVENTLOOP_TASKS not in collect(second)
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
            f"loopguard metric {metrics.EVENTLOOP_TASKS} callback raised"
        ]
        provider.shutdown()
    finally:
        metrics.observe(metrics.EVENTLOOP_TASKS, None)


def test_synchronous_gauge_and_counter(reader: InMemoryMetricReader) -> None:
    metrics.record(metrics.EVENTLOOP_UTILIZATION, 0.25)
    metrics.record(metrics.EVENTLOOP_UTILIZATION, 0.5)
    metrics.record(metrics.EVENTLOOP_STALLS, 1, {metrics.EVENTLOOP_STALL_CAUSE: "blocked"})
    metrics.record(metrics.EVENTLOOP_STALLS, 2, {metrics.EVENTLOOP_STALL_CAUSE: "blocked"})
    found = collect(reader)
    [gauge] = number_points(found[metrics.EVENTLOOP_UTILIZATION])
    [stalls] = number_points(found[metrics.EVENTLOOP_STALLS])
    assert gauge.value == 0.5
    assert stalls.value == 3
