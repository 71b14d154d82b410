"""Broadcast: the broadcaster-compatible API, bounded subscribers, and faults.

Memory and real Redis (a ``redis-server`` per test); no mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio  # noqa: F401 - imported before any loop runs, as an app does
import services
from loopguard_integrations.broadcast import (
    BackplaneUnavailable,
    Broadcast,
    Event,
    SubscriberOverflow,
    Unsubscribed,
)

pytestmark = pytest.mark.anyio

BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[services.RedisServer]:
    with services.restartable_redis(tmp_path) as server:
        yield server


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# -- construction and misuse -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("kafka://localhost:9092", ["unknown scheme 'kafka'", "memory://"]),
        ("localhost:6379", ["unknown scheme"]),
        ("redis://localhost:notaport", ["port"]),
        ("redis://localhost:6379/zero", ["database 'zero'"]),
        ("redis://:6379", ["no host"]),
        ("memory://somewhere", ["memory URL takes nothing"]),
    ],
)
def test_bad_urls_are_refused_at_construction(url: str, words: list[str]) -> None:
    with pytest.raises(ValueError, match="Broadcast url") as info:
        Broadcast(url)
    for word in words:
        assert word in str(info.value)


def test_a_password_never_appears_in_messages() -> None:
    with pytest.raises(ValueError) as info:
        Broadcast("redis://:hunter2@localhost:6379/x")
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)
    assert "hunter2" not in repr(Broadcast("redis://:hunter2@localhost:6379/0"))


def test_a_url_that_is_not_a_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="url must be a str"):
        Broadcast(6379)  # type: ignore[arg-type]


async def test_publish_and_subscribe_need_a_connection() -> None:
    broadcast = Broadcast("memory://")
    with pytest.raises(RuntimeError, match=r"publish\(\).*connect\(\)"):
        await broadcast.publish("news", "x")
    with pytest.raises(RuntimeError, match=r"subscribe\(\).*connect\(\)"):
        async with broadcast.subscribe("news"):
            pass
    await broadcast.connect()
    await broadcast.disconnect()
    with pytest.raises(RuntimeError, match="disconnected"):
        await broadcast.publish("news", "x")


async def test_unsupported_messages_and_channels_are_type_errors() -> None:
    async with Broadcast("memory://") as broadcast:
        with pytest.raises(TypeError, match="message must be str or bytes, got dict"):
            await broadcast.publish("news", {"a": 1})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="channel must be a str"):
            await broadcast.publish(b"news", "x")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="maxsize must be an int >= 1"):
            async with broadcast.subscribe("news", maxsize=0):
                pass
        with pytest.raises(ValueError, match="overflow must be one of"):
            async with broadcast.subscribe("news", overflow="wait"):  # type: ignore[arg-type]
                pass


# -- the broadcaster API -----------------------------------------------------------------


async def test_the_broadcaster_shape_works_unchanged() -> None:
    """The code encode/broadcaster users have, with only the import changed."""
    received: list[Event] = []
    async with Broadcast("memory://") as broadcast:  # noqa: SIM117 - their code, as it is
        async with broadcast.subscribe(channel="chatroom") as subscriber:
            await broadcast.publish(channel="chatroom", message="hello")
            await broadcast.publish(channel="other", message="not for us")
            await broadcast.publish(channel="chatroom", message=b"\x00bytes")
            async for event in subscriber:
                received.append(event)
                if len(received) == 2:
                    break
    assert received == [Event("chatroom", "hello"), Event("chatroom", b"\x00bytes")]
    assert received[0].channel == "chatroom"
    assert received[0].message == "hello"
    assert isinstance(received[1].message, bytes)


async def test_iteration_ends_when_the_broadcast_disconnects() -> None:
    broadcast = Broadcast("memory://")
    await broadcast.connect()
    got: list[str | bytes] = []

    async def listen() -> None:
        async with broadcast.subscribe("c") as subscriber:
            async for event in subscriber:
                got.append(event.message)

    task = asyncio.create_task(listen())
    await wait_for(lambda: bool(broadcast._subscribers))
    await broadcast.publish("c", "last")
    await broadcast.disconnect()
    await asyncio.wait_for(task, 5)
    assert got == ["last"]


async def test_get_after_the_subscription_ended_raises_unsubscribed() -> None:
    async with Broadcast("memory://") as broadcast:
        async with broadcast.subscribe("c") as subscriber:
            pass
        with pytest.raises(Unsubscribed):
            await subscriber.get()


# -- bounded subscribers -----------------------------------------------------------------


async def test_a_subscriber_that_never_reads_delays_nobody() -> None:
    """Thousands of publishes complete while one subscriber reads nothing; its drops are
    counted and a reading subscriber gets every message."""
    got: list[str | bytes] = []
    async with (
        Broadcast("memory://") as broadcast,
        broadcast.subscribe("c", maxsize=10) as idle,
        broadcast.subscribe("c", maxsize=10_000) as reader,
    ):
        for i in range(10_000):
            report = await broadcast.publish("c", str(i))
            assert report.delivered == 2
            if i % 500 == 0:
                await asyncio.sleep(0)  # the test's own loop, not publish, would stall
        assert idle.dropped == 10_000 - 10
        assert idle.drops["overflow"] == 10_000 - 10
        assert idle.pending == 10
        # drop_oldest: the newest ten are the ones kept.
        assert [(await idle.get()).message for _ in range(10)] == [
            str(i) for i in range(9_990, 10_000)
        ]
        while reader.pending:
            got.append((await reader.get()).message)
            if len(got) % 500 == 0:
                await asyncio.sleep(0)
    assert got == [str(i) for i in range(10_000)]


async def test_drop_newest_keeps_the_first_messages() -> None:
    async with (
        Broadcast("memory://") as broadcast,
        broadcast.subscribe("c", maxsize=3, overflow="drop_newest") as sub,
    ):
        reports = [await broadcast.publish("c", str(i)) for i in range(5)]
        assert [r.dropped for r in reports] == [0, 0, 0, 1, 1]
        assert [(await sub.get()).message for _ in range(3)] == ["0", "1", "2"]
        assert sub.dropped == 2


async def test_close_ends_a_lagging_subscriber_after_what_it_had() -> None:
    async with (
        Broadcast("memory://") as broadcast,
        broadcast.subscribe("c", maxsize=2, overflow="close") as sub,
        broadcast.subscribe("c") as other,
    ):
        for i in range(3):
            report = await broadcast.publish("c", str(i))
        assert report.evicted == 1
        assert report.delivered == 1  # the other subscriber
        assert [e.message async for e in _take(sub, 2)] == ["0", "1"]
        with pytest.raises(SubscriberOverflow, match="maxsize=2"):
            await sub.get()
        assert sub.overflowed
        # Publishing goes on for the others.
        await broadcast.publish("c", "3")
        assert other.pending == 4


async def _take(sub: Any, n: int) -> AsyncIterator[Event]:
    for _ in range(n):
        yield await sub.get()


async def test_max_bytes_drops_a_message_too_large() -> None:
    async with (
        Broadcast("memory://") as broadcast,
        broadcast.subscribe("c", max_bytes=10) as sub,
    ):
        report = await broadcast.publish("c", "é" * 6)  # 12 bytes in UTF-8
        assert report.dropped == 1
        assert sub.drops["too_large"] == 1


async def test_block_makes_publish_wait_for_room() -> None:
    async with (
        Broadcast("memory://") as broadcast,
        broadcast.subscribe("c", maxsize=1, overflow="block") as sub,
    ):
        await broadcast.publish("c", "1")
        second = asyncio.create_task(broadcast.publish("c", "2"))
        await asyncio.sleep(0.05)
        assert not second.done()  # waiting for room
        assert (await sub.get()).message == "1"
        await asyncio.wait_for(second, 5)
        assert (await sub.get()).message == "2"
        assert sub.dropped == 0


# -- Redis ---------------------------------------------------------------------------------


async def test_redis_delivers_across_broadcasts_once_each(
    redis_server: services.RedisServer,
) -> None:
    """Two Broadcasts (two connections, as two processes would have): each subscriber
    gets each message once; the publisher's own echo from Redis is skipped."""
    async with (
        Broadcast(redis_server.url) as a,
        Broadcast(redis_server.url) as b,
        a.subscribe("room") as sub_a,
        b.subscribe("room") as sub_b,
    ):
        await a.publish("room", "from a")
        await b.publish("room", b"from b")
        got_a = [(await asyncio.wait_for(sub_a.get(), 5)).message for _ in range(2)]
        got_b = [(await asyncio.wait_for(sub_b.get(), 5)).message for _ in range(2)]
        await wait_for(lambda: a.stats.echoes == 1 and b.stats.echoes == 1)
        await asyncio.sleep(0.2)  # time for a duplicate to show up if there were one
        assert sub_a.pending == 0
        assert sub_b.pending == 0
    assert sorted(got_a, key=str) == sorted(["from a", b"from b"], key=str)
    assert sorted(got_b, key=str) == sorted(["from a", b"from b"], key=str)
    assert a.stats.received == 1
    assert b.stats.received == 1
    assert a.stats.lost == b.stats.lost == 0


async def test_plain_redis_publishes_are_delivered_as_they_are(
    redis_server: services.RedisServer,
) -> None:
    from loopguard_integrations.broadcast._redis import _client_options
    from redis.asyncio import Redis

    client = Redis.from_url(redis_server.url, **_client_options())
    try:
        async with Broadcast(redis_server.url) as broadcast:
            async with broadcast.subscribe("feed") as sub:
                await client.publish("feed", "plain text")
                await client.publish("feed", b"\xff\xfe")
                assert (await asyncio.wait_for(sub.get(), 5)).message == "plain text"
                assert (await asyncio.wait_for(sub.get(), 5)).message == b"\xff\xfe"
            assert broadcast.stats.foreign == 2
    finally:
        await client.aclose()


async def test_unreachable_redis_fails_connect_naming_the_url(tmp_path: Path) -> None:
    port = services._free_port()
    broadcast = Broadcast(f"redis://:pw@127.0.0.1:{port}/0", connect_timeout=0.5)
    with pytest.raises(BackplaneUnavailable, match=rf"127\.0\.0\.1:{port}.*attempts") as info:
        await broadcast.connect()
    assert "pw@" not in str(info.value)
    assert not broadcast.connected
    with pytest.raises(RuntimeError, match="connect"):
        await broadcast.publish("c", "x")


async def test_redis_restart_resumes_delivery_and_counts_the_gap(
    redis_server: services.RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis killed mid-stream and restarted on the same port: the subscriber's loop sees
    no exception, delivery resumes within 5 s, the outage is logged once, and every
    numbered message is either received or counted lost."""
    caplog.set_level(logging.WARNING, logger="loopguard.broadcast")
    received: list[int] = []
    failed = 0
    async with Broadcast(redis_server.url) as publisher, Broadcast(redis_server.url) as listener:

        async def listen() -> None:
            async with listener.subscribe("ticks") as sub:
                async for event in sub:
                    received.append(int(event.message))

        reading = asyncio.create_task(listen())
        await wait_for(lambda: "ticks" in listener._listening)
        await asyncio.sleep(0.1)

        async def publish(n: int) -> None:
            nonlocal failed
            try:
                await publisher.publish("ticks", str(n))
            except BackplaneUnavailable:
                failed += 1

        n = 0
        for _ in range(20):
            n += 1
            await publish(n)
        await wait_for(lambda: len(received) == 20)

        await asyncio.to_thread(redis_server.kill)
        for _ in range(10):  # published into the outage
            n += 1
            await publish(n)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(redis_server.start)
        restarted = asyncio.get_running_loop().time()
        before = len(received)
        while len(received) == before:  # keep publishing until one gets through
            assert asyncio.get_running_loop().time() - restarted < 5, "no delivery in 5 s"
            n += 1
            await publish(n)
            await asyncio.sleep(0.05)
        resumed_after = asyncio.get_running_loop().time() - restarted
        last = n
        await wait_for(lambda: received[-1] == last)
        assert not reading.done()  # no exception reached the subscriber's loop

    await asyncio.wait_for(reading, 5)
    assert resumed_after < 5
    assert failed >= 10
    assert received == sorted(received)
    assert listener.stats.lost == last - len(received)
    assert listener.stats.lost >= 10
    assert listener.stats.reconnects == 1
    assert sum(listener.stats.errors.values()) >= 1
    lost_logs = [r for r in caplog.records if "lost the Redis pub/sub connection" in r.message]
    assert len([r for r in lost_logs if r.name == "loopguard.broadcast"]) <= 2  # one per Broadcast
    assert any(redis_server.url.split("//")[1] in r.getMessage() for r in lost_logs)


@pytest.fixture
def two_redis_servers(tmp_path: Path) -> Iterator[list[services.RedisServer]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        services.restartable_redis(tmp_path / "a") as one,
        services.restartable_redis(tmp_path / "b") as two,
    ):
        yield [one, two]


async def test_channels_partitioned_over_two_redis_servers_each_travel_on_their_own(
    two_redis_servers: list[services.RedisServer],
) -> None:
    """The recipe in "Beyond one Redis server": one Broadcast per server in each
    process, a channel's server chosen by a stable hash of its name. Every message
    reaches the other process once, and each server carries only its own channels."""
    import zlib

    from loopguard_integrations.broadcast._redis import _client_options
    from redis.asyncio import Redis

    def shard(broadcasts: list[Broadcast], channel: str) -> Broadcast:
        return broadcasts[zlib.crc32(channel.encode()) % len(broadcasts)]

    channels = [f"room-{i}" for i in range(8)]
    urls = [server.url for server in two_redis_servers]
    carried: list[set[str]] = []
    async with (
        Broadcast(urls[0]) as a0,
        Broadcast(urls[1]) as a1,
        Broadcast(urls[0]) as b0,
        Broadcast(urls[1]) as b1,
        contextlib.AsyncExitStack() as stack,
    ):
        worker_a, worker_b = [a0, a1], [b0, b1]
        subscribers = [
            await stack.enter_async_context(shard(worker_b, c).subscribe(c)) for c in channels
        ]
        for broadcast in worker_b:
            wanted = {c for c in channels if shard(worker_b, c) is broadcast}

            def listening(b: Broadcast = broadcast, w: set[str] = wanted) -> bool:
                return w <= set(b._listening)

            await wait_for(listening)
        for c in channels:
            await shard(worker_a, c).publish(c, f"hello {c}")
        for c, sub in zip(channels, subscribers, strict=True):
            event = await asyncio.wait_for(sub.get(), 5)
            assert (event.channel, event.message) == (c, f"hello {c}")
        # What each server carries: exactly the channels hashed to it.
        for url in urls:
            client = Redis.from_url(url, **_client_options())
            try:
                names = await client.pubsub_channels()
            finally:
                await client.aclose()
            carried.append({n if isinstance(n, str) else n.decode() for n in names})
        await asyncio.sleep(0.2)  # time for a duplicate to show up if there were one
        assert all(sub.pending == 0 for sub in subscribers)
    assert carried[0] | carried[1] == set(channels)
    assert not carried[0] & carried[1]
    assert carried[0] and carried[1]  # both servers took a share of the 8 channels
