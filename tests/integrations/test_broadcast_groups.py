"""Broadcast groups: fan-out to real WebSocket connections (the ``websockets`` library,
on loopback), eviction of slow clients, removal of disconnected ones."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio  # noqa: F401 - imported before any loop runs, as an app does
import services
from loopguard_integrations.broadcast import Broadcast, Group, Member
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def server_for(group: Group, members: list[Member] | None = None) -> AsyncIterator[str]:
    """A websockets server whose handler attaches each connection to the group.

    Send buffers are capped at 64 KiB, so a client that stops reading backs the server
    up after a few messages rather than after the megabytes Linux allows on loopback.
    """

    async def handler(ws: ServerConnection) -> None:
        sock = ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        async with group.attach(ws) as member:
            if members is not None:
                members.append(member)
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


class StuckClient:
    """A WebSocket client that completes the handshake and then never reads its socket
    (a frozen browser tab, a phone that lost signal), with a small receive buffer so
    the server's writes back up after a few kilobytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def close_code(self, timeout: float = 20.0) -> int:
        """Read again, to the end: the close code the server sent last (0 if none)."""
        data = await asyncio.wait_for(self.reader.read(), timeout)
        i = data.rfind(b"\x88\x02")  # unmasked close frame with a 2-byte code
        if i < 0:
            i = data.rfind(b"\x88")
        if i < 0 or len(data) < i + 4:
            return 0
        return int.from_bytes(data[i + 2 : i + 4], "big")

    def abort(self) -> None:
        self.writer.transport.abort()


async def slow_client(url: str) -> StuckClient:
    host, _, rest = url.removeprefix("ws://").partition(":")
    port, _, path = rest.partition("/")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    writer.write(
        f"GET /{path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    return StuckClient(reader, writer)


async def read_all(ws: ClientConnection, count: int, out: list[str | bytes]) -> None:
    while len(out) < count:
        out.append(await ws.recv())


async def test_every_member_gets_every_message_in_order() -> None:
    group = Group("room")
    async with server_for(group) as url:
        clients = [await connect(url) for _ in range(20)]
        await wait_for(lambda: group.members == 20)
        for i in range(50):
            report = await group.publish(f"m{i}")
            assert report.delivered == 20
            assert report.dropped == report.evicted == 0
            await asyncio.sleep(0)
        for ws in clients:
            assert [await asyncio.wait_for(ws.recv(), 10) for _ in range(50)] == [
                f"m{i}" for i in range(50)
            ]
            await ws.close()
        await wait_for(lambda: group.members == 0)
    assert group.sent == 20 * 50
    await group.aclose()


async def test_a_client_that_stops_reading_is_evicted_with_1013() -> None:
    """Healthy clients get everything; the one that stopped reading is closed with 1013
    (seen once it reads again) and counted; no publish waited for it."""
    group = Group("room", maxsize=8, overflow="close")
    members: list[Member] = []
    payload = "x" * 8192
    async with server_for(group, members) as url:
        stuck = await slow_client(url)
        healthy = [await connect(url) for _ in range(3)]
        await wait_for(lambda: group.members == 4)
        slow_member = members[0]
        got: list[list[str | bytes]] = [[] for _ in healthy]
        readers = [
            asyncio.create_task(read_all(ws, 300, g)) for ws, g in zip(healthy, got, strict=True)
        ]
        evicted_at = None
        for i in range(300):
            report = await group.publish(f"{i:04d}{payload}")
            if report.evicted:
                evicted_at = i
            await asyncio.sleep(0.001)
        await asyncio.wait_for(asyncio.gather(*readers), 30)
        assert evicted_at is not None
        assert slow_member.evicted == "overflow"
        assert group.evictions["overflow"] == 1
        assert group.members == 3
        assert all(len(g) == 300 for g in got)
        assert [str(m)[:4] for m in got[0]] == [f"{i:04d}" for i in range(300)]
        # The evicted client, reading again, finds the close code after what it had.
        stuck.writer.transport.resume_reading()  # type: ignore[attr-defined]
        assert await stuck.close_code() == 1013
        stuck.abort()
        for ws in healthy:
            await ws.close()
    await group.aclose()


async def test_drop_oldest_keeps_a_slow_client_and_counts_its_drops() -> None:
    group = Group("room", maxsize=4, overflow="drop_oldest")
    members: list[Member] = []
    async with server_for(group, members) as url:
        stuck = await slow_client(url)
        await wait_for(lambda: group.members == 1)
        dropped = 0
        for i in range(200):
            dropped += (await group.publish(f"{i:04d}" + "y" * 8192)).dropped
            await asyncio.sleep(0.001)
        assert dropped > 0
        assert members[0].dropped == dropped == group.drops["overflow"]
        assert group.members == 1
        assert members[0].evicted is None
        # Reading again, it gets the newest message last: the oldest ones made room.
        stuck.writer.transport.resume_reading()  # type: ignore[attr-defined]
        data = b""
        while not data.endswith(b"0199" + b"y" * 8192):
            data += await asyncio.wait_for(stuck.reader.read(1 << 20), 20)
        stuck.abort()
    await group.aclose()


async def test_a_send_that_hangs_is_evicted_after_send_timeout() -> None:
    group = Group("room", maxsize=1000, overflow="drop_oldest", send_timeout=0.5)
    members: list[Member] = []
    async with server_for(group, members) as url:
        stuck = await slow_client(url)
        await wait_for(lambda: group.members == 1)
        for i in range(100):
            await group.publish(f"{i:04d}" + "z" * 8192)
            await asyncio.sleep(0.01)
            if members[0].evicted:
                break
        await wait_for(lambda: members[0].evicted == "send_timeout")
        assert group.evictions["send_timeout"] == 1
        assert group.members == 0
        stuck.abort()
    await group.aclose()


async def test_connect_disconnect_cycles_leave_nothing_behind() -> None:
    """Hundreds of connect/disconnect cycles (the benchmark does 10,000): the group is
    empty, every member object is freed, no writer task is left."""
    group = Group("room")
    refs: list[weakref.ref[Member]] = []
    members: list[Member] = []
    async with server_for(group, members) as url:
        for batch in range(10):
            clients = [await connect(url) for _ in range(30)]
            await wait_for(lambda: group.members == 30)
            await group.publish(f"batch {batch}")
            for ws in clients:
                assert await asyncio.wait_for(ws.recv(), 10) == f"batch {batch}"
                await ws.close()
            await wait_for(lambda: group.members == 0)
            refs.extend(weakref.ref(m) for m in members)
            members.clear()
            del clients
    gc.collect()
    assert len(refs) == 300
    assert [r for r in refs if r() is not None] == []
    writers = [t for t in asyncio.all_tasks() if t.get_name() == "loopguard-group-writer"]
    assert writers == []
    await group.aclose()


async def test_groups_reject_block_and_bad_objects() -> None:
    with pytest.raises(ValueError, match="'block' would let one slow connection"):
        Group("room", overflow="block")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="send_timeout"):
        Group("room", send_timeout=0)
    group = Group("room")
    with pytest.raises(TypeError, match="cannot attach a int"):
        async with group.attach(42):
            pass
    await group.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        async with group.attach(object()):
            pass


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[services.RedisServer]:
    with services.restartable_redis(tmp_path) as server:
        yield server


async def test_a_broadcast_group_hears_publishes_from_another_process_connection(
    redis_server: services.RedisServer,
) -> None:
    """A group bound to a channel gets what another Broadcast (another connection to
    Redis, as another worker has) publishes; a local publish reaches it once."""
    async with (
        Broadcast(redis_server.url) as here,
        Broadcast(redis_server.url) as there,
        here.group("room") as group,
        server_for(group) as url,
    ):
        clients = [await connect(url) for _ in range(5)]
        await wait_for(lambda: group.members == 5)
        await there.publish("room", "from the other worker")
        report = await here.publish("room", "from here")
        assert report.delivered == 5
        for ws in clients:
            got = {await asyncio.wait_for(ws.recv(), 10) for _ in range(2)}
            assert got == {"from the other worker", "from here"}
        await asyncio.sleep(0.2)
        assert group.sent == 10  # no duplicate from Redis's echo
        for ws in clients:
            await ws.close()
