"""guard_receive for websockets' asyncio connections: a real server and real clients."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
import weakref
from typing import Any

import pytest
from helpers import collect, line_of
from loopguard_integrations import _receiver, _wsmetrics
from loopguard_integrations.websockets import guard_receive
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from wsservers import (
    client_process,
    eventually,
    guard_tasks,
    ready,
    wait_until,
    websockets_server,
    websockets_server_async,
)

import loopguard
from loopguard import metrics
from loopguard.events import ConnectionClosed


class Handler:
    """A server handler that guards its connection and records what happened."""

    def __init__(self, **options: Any) -> None:
        self.options = {"maxsize": 100, **options}
        self.received: list[str | bytes] = []
        self.inboxes: list[_receiver.Inbox] = []
        self.errors: list[BaseException] = []
        self.done = 0
        self.delay = 0.0
        self.raise_at: int | None = None

    async def __call__(self, connection: ServerConnection) -> None:
        try:
            async with guard_receive(connection, **self.options) as inbox:
                self.inboxes.append(inbox)
                async for message in inbox:
                    self.received.append(message)
                    if self.raise_at is not None and len(self.received) == self.raise_at:
                        raise KeyError("consumer failed")
                    if self.delay:
                        await asyncio.sleep(self.delay)
        except BaseException as exc:
            self.errors.append(exc)
            self.tasks_after = guard_tasks(asyncio.get_running_loop())
            raise
        finally:
            self.done += 1
        self.tasks_after = guard_tasks(asyncio.get_running_loop())


@pytest.mark.asyncio
async def test_order_end_and_nothing_left() -> None:
    handler = Handler(maxsize=4)
    async with websockets_server_async(handler) as (url, _):
        async with connect(url) as client:
            for i in range(500):
                await client.send(str(i) if i % 2 else bytes([i % 256]))
                if i % 20 == 0:
                    await asyncio.sleep(0)  # a send that fits the buffer does not yield
        await eventually(lambda: handler.done == 1)
    inbox = handler.inboxes[0]
    assert handler.received == [str(i) if i % 2 else bytes([i % 256]) for i in range(500)]
    assert (inbox.delivered, inbox.dropped, inbox.close_code, inbox.close_reason) == (
        500,
        0,
        1000,
        "peer",
    )
    assert handler.tasks_after == []
    with pytest.raises(RuntimeError, match="outside its"):
        inbox.__aiter__()


@pytest.mark.asyncio
async def test_a_client_connection_can_be_guarded_too() -> None:
    async def sender(connection: ServerConnection) -> None:
        for i in range(100):
            await connection.send(str(i))
        await connection.close()

    async with (
        websockets_server_async(sender) as (url, _),
        connect(url) as client,
        guard_receive(client, maxsize=10, ping_interval=None) as inbox,
    ):
        got = [m async for m in inbox]
    assert got == [str(i) for i in range(100)]
    assert inbox.close_code == 1000


@pytest.mark.asyncio
async def test_the_consumer_raising_stops_the_receiver_and_propagates() -> None:
    handler = Handler(maxsize=4)
    handler.raise_at = 3
    async with websockets_server_async(handler) as (url, _), connect(url) as client:
        for i in range(10):
            await client.send(str(i))
        await eventually(lambda: handler.done == 1)
    (error,) = handler.errors
    assert isinstance(error, KeyError)
    assert handler.tasks_after == []


@pytest.mark.asyncio
async def test_cancellation_leaves_no_task() -> None:
    started = asyncio.Event()
    seen: dict[str, Any] = {}

    async def handler(connection: ServerConnection) -> None:
        async with guard_receive(connection, maxsize=4) as inbox:
            seen["inbox"] = inbox
            seen["task"] = asyncio.current_task()
            async for _ in inbox:
                pass

    async with websockets_server_async(handler) as (url, loops), connect(url) as client:
        await client.send("x")
        await eventually(lambda: "task" in seen)
        loops.loop.call_soon_threadsafe(seen["task"].cancel)
        await eventually(lambda: seen["task"].done())
        left = await loops.arun(_tasks_of(loops.loop))
    del started
    assert left == []


async def _tasks_of(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[Any]]:
    return guard_tasks(loop)


@pytest.mark.asyncio
async def test_batches_group_small_messages_in_order() -> None:
    batches: list[list[str | bytes]] = []

    async def handler(connection: ServerConnection) -> None:
        async with guard_receive(connection, maxsize=1000) as inbox:
            async for batch in inbox.batches(50, 0.05):
                batches.append(batch)

    async with websockets_server_async(handler) as (url, _):
        async with connect(url) as client:
            for i in range(300):
                await client.send(str(i))
                if i % 20 == 0:
                    await asyncio.sleep(0)
        await eventually(lambda: sum(map(len, batches)) == 300)
    assert [m for b in batches for m in b] == [str(i) for i in range(300)]
    assert all(1 <= len(b) <= 50 for b in batches)
    assert len(batches) < 300


def test_bad_arguments_fail_at_the_call() -> None:
    with pytest.raises(TypeError, match="connection must be"):
        guard_receive(object(), maxsize=1)  # type: ignore[arg-type]
    for kwargs, named in [
        ({"maxsize": 0}, "maxsize"),
        ({"maxsize": 1, "max_bytes": 0}, "max_bytes"),
        ({"maxsize": 1, "overflow": "oldest"}, "overflow"),
        ({"maxsize": 1, "ping_interval": -1.0}, "ping_interval"),
        ({"maxsize": 1, "ping_timeout": 0}, "ping_timeout"),
    ]:
        with pytest.raises(ValueError, match=named):
            guard_receive(object(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.loopguard(enabled=False)  # the server loop is blocked on purpose
def test_keepalive_closes_a_frozen_client_with_1011_and_names_the_stall() -> None:
    handler = Handler(maxsize=10, ping_interval=0.5, ping_timeout=1.0)
    with loopguard.watch(threshold=0.1, record=100) as wd:
        with (
            websockets_server(handler, ping_interval=None) as (url, loops),
            client_process(url, "1", "0", "wait") as c,
        ):
            assert ready(c) == "sent 1"
            wait_until(lambda: handler.received == ["0"])
            wait_until(lambda: handler.inboxes[0].ping_rtt is not None, what="a ping")
            os.kill(c.pid, signal.SIGSTOP)
            loops.loop.call_soon_threadsafe(_hold_the_loop)
            started = time.monotonic()
            wait_until(lambda: handler.done == 1, what="keepalive to close")
            took = time.monotonic() - started
            wd.flush()
        events = [e for e in wd.events if isinstance(e, ConnectionClosed)]
    inbox = handler.inboxes[0]
    assert (inbox.close_code, inbox.close_reason) == (1011, "keepalive")
    assert took < 10  # 0.9 s in theory; generous for a loaded machine
    (event,) = events
    assert (event.code, event.reason, event.depth, event.maxsize) == (1011, "keepalive", 0, 10)
    assert event.ping_rtt is not None
    assert event.stall is not None
    assert event.stall.line == line_of("MARK:blocks-the-loop", __file__)
    assert "blocked" in str(event) and "1011" in str(event)


def _hold_the_loop() -> None:
    time.sleep(0.3)  # MARK:blocks-the-loop


def test_abrupt_client_deaths_leave_nothing_behind(reader: InMemoryMetricReader) -> None:
    handler = Handler(maxsize=5)
    refs: list[weakref.ref[_receiver.Inbox]] = []
    clients = 12
    with websockets_server(handler) as (url, loops):
        for _ in range(clients):
            with client_process(url, "3", "0", "wait") as c:
                assert ready(c) == "sent 3"
                wait_until(lambda: len(handler.inboxes) > len(refs), 60)
                refs.append(weakref.ref(handler.inboxes[-1]))
                os.kill(c.pid, signal.SIGKILL)
        wait_until(lambda: handler.done == clients, 60, what="every inbox to end")
        assert loops.run(_tasks_of(loops.loop)) == []
    assert _receiver.active_connections() == 0
    active = collect(reader)[metrics.WEBSOCKET_CONNECTION_ACTIVE]
    unrouted = [p for p in active.data.data_points if not p.attributes]
    assert [getattr(p, "value", None) for p in unrouted] == [0]
    handler.inboxes.clear()
    gc.collect()
    assert [r for r in refs if r() is not None] == []


@pytest.mark.asyncio
async def test_metrics(reader: InMemoryMetricReader) -> None:
    _wsmetrics.sampler.reset()  # below the budget every message's histograms are kept
    handler = Handler(maxsize=3, overflow="drop_newest", ping_interval=0.1, route="/feed")
    handler.delay = 0.5
    async with websockets_server_async(handler) as (url, _):
        async with connect(url) as client:
            for i in range(10):
                await client.send(str(i))
            await eventually(lambda: bool(handler.inboxes) and handler.inboxes[0].dropped >= 6)
            await eventually(lambda: handler.inboxes[0].ping_rtt is not None)
            live = collect(reader)
            route = {"http.route": "/feed"}
            assert _value(live, metrics.WEBSOCKET_CONNECTION_ACTIVE, route) == 1
            assert _value(live, metrics.WEBSOCKET_RECEIVE_QUEUE_CAPACITY, route) == 3
            assert 1 <= _value(live, metrics.WEBSOCKET_RECEIVE_QUEUE_SIZE, route) <= 3
            assert _value(live, metrics.WEBSOCKET_RECEIVE_LAG, route) > 0
        await eventually(lambda: handler.done == 1)
    inbox = handler.inboxes[0]
    after = collect(reader)
    messages = metrics.WEBSOCKET_RECEIVE_MESSAGES
    delivered = {"http.route": "/feed", "websocket.receive.message.outcome": "delivered"}
    dropped = {
        "http.route": "/feed",
        "websocket.receive.message.outcome": "dropped",
        "error.type": "overflow",
    }
    assert _value(after, messages, delivered) == inbox.delivered
    assert _value(after, messages, dropped) == inbox.drops["overflow"] >= 6
    assert inbox.delivered + inbox.dropped == 10
    assert _value(after, metrics.WEBSOCKET_CONNECTION_ACTIVE, {"http.route": "/feed"}) == 0
    closes = {"http.route": "/feed", "websocket.close.code": 1000, "websocket.close.reason": "peer"}
    assert _value(after, metrics.WEBSOCKET_CLOSES, closes) == 1
    waits = _histogram(after, metrics.WEBSOCKET_RECEIVE_TIME_IN_QUEUE)
    assert waits.count == inbox.delivered and waits.max >= 0.4
    assert _histogram(after, metrics.WEBSOCKET_PROCESS_DURATION).count >= 1
    assert _histogram(after, metrics.WEBSOCKET_PING_DURATION).count >= 1
    for name, metric in after.items():
        allowed = set(metrics.SPECS[name].attributes)
        for point in metric.data.data_points:
            assert set(dict(point.attributes or {})) <= allowed, name


def _value(found: dict[str, Any], name: str, attributes: dict[str, Any]) -> float:
    for point in found[name].data.data_points:
        if dict(point.attributes or {}) == attributes:
            return float(point.value)
    raise AssertionError(f"no {name} point with {attributes}")


def _histogram(found: dict[str, Any], name: str) -> HistogramDataPoint:
    (point,) = found[name].data.data_points
    assert isinstance(point, HistogramDataPoint)
    return point


# The servers' loops run in threads of the test process: on a loaded machine a GIL
# hand-off alone (pytest-xdist's I/O thread) can hold them for hundreds of ms.
pytestmark = pytest.mark.loopguard(threshold=1.0)
