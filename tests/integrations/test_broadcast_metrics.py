"""Broadcast's metrics, read with a real OpenTelemetry SDK reader."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio  # noqa: F401 - imported before any loop runs, as an app does
import services
from helpers import collect
from loopguard_integrations.broadcast import BackplaneUnavailable, Broadcast
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from loopguard import metrics

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[services.RedisServer]:
    with services.restartable_redis(tmp_path) as server:
        yield server


def points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    found = collect(reader)
    assert name in found, f"{name} not reported; have {sorted(found)}"
    return list(found[name].data.data_points)


def total(reader: InMemoryMetricReader, name: str, **attributes: str) -> float:
    return float(
        sum(
            p.value
            for p in points(reader, name)
            if all(p.attributes.get(k) == v for k, v in attributes.items())
        )
    )


async def test_subscribers_queues_deliveries_drops_and_fanout(
    reader: InMemoryMetricReader,
) -> None:
    async with (
        Broadcast("memory://") as broadcast,
        broadcast.subscribe("c", maxsize=2) as slow,
        broadcast.subscribe("c", maxsize=2, overflow="close"),
        broadcast.subscribe("c"),
    ):
        for i in range(5):
            await broadcast.publish("c", str(i))
        assert total(reader, metrics.BROADCAST_SUBSCRIBER_COUNT) == 2  # one was evicted
        assert slow.pending == 2
        assert (
            total(reader, metrics.BROADCAST_QUEUE_SIZE, **{"broadcast.queue.target": "subscriber"})
            == 7
        )
        delivered = {
            "broadcast.message.target": "subscriber",
            "broadcast.message.outcome": "delivered",
        }
        assert total(reader, metrics.BROADCAST_MESSAGES, **delivered) == 5 + 5 + 2
        dropped = {
            "broadcast.message.outcome": "dropped",
            "broadcast.message.drop_reason": "overflow",
        }
        assert total(reader, metrics.BROADCAST_MESSAGES, **dropped) == 3 + 1
        evicted = {
            "broadcast.eviction.target": "subscriber",
            "broadcast.eviction.reason": "overflow",
        }
        assert total(reader, metrics.BROADCAST_EVICTIONS, **evicted) == 1
        (fanout,) = points(reader, metrics.BROADCAST_FANOUT_DURATION)
        assert fanout.count == 5
    assert total(reader, metrics.BROADCAST_SUBSCRIBER_COUNT) == 0


async def test_backplane_lag_errors_reconnects_and_losses(
    reader: InMemoryMetricReader, redis_server: services.RedisServer
) -> None:
    async with (
        Broadcast(redis_server.url) as publisher,
        Broadcast(redis_server.url) as listener,
        listener.subscribe("c") as sub,
    ):
        await publisher.publish("c", "1")
        await asyncio.wait_for(sub.get(), 10)
        (lag,) = points(reader, metrics.BROADCAST_BACKPLANE_LAG)
        assert lag.count == 1
        assert 0 <= lag.sum < 5

        await asyncio.to_thread(redis_server.kill)
        with pytest.raises(BackplaneUnavailable, match="could not publish"):
            await publisher.publish("c", "2")  # lost: numbered, never sent
        await asyncio.to_thread(redis_server.start)
        # Each Broadcast's pub/sub connection reconnects on its own schedule.
        for _ in range(500):
            if listener.stats.reconnects and publisher.stats.reconnects:
                break
            await asyncio.sleep(0.02)
        await publisher.publish("c", "3")
        assert (await asyncio.wait_for(sub.get(), 10)).message == "3"
        # Both Broadcasts had a pub/sub connection, and both reconnected.
        assert listener.stats.reconnects == publisher.stats.reconnects == 1
        assert total(reader, metrics.BROADCAST_BACKPLANE_RECONNECTS) == 2
        assert total(reader, metrics.BROADCAST_BACKPLANE_LOST) == 1
        assert total(reader, metrics.BROADCAST_BACKPLANE_ERRORS) >= 2
        error_types = {
            p.attributes["error.type"] for p in points(reader, metrics.BROADCAST_BACKPLANE_ERRORS)
        }
        assert "ConnectionError" in error_types
