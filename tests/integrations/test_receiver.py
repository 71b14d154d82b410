"""The receiver core, framework-free: a property test over random traffic and policies.

The transport here is the core's own interface played from a list (the framework
adapters are tested against real servers in test_starlette.py and test_websockets.py).
"""

from __future__ import annotations

import asyncio
from typing import get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loopguard_integrations._handover import GRACE
from loopguard_integrations._queue import Overflow
from loopguard_integrations._receiver import Inbox, Message, guard


class ListTransport:
    """Plays ``messages`` as if received, yielding to the loop every ``pace`` messages."""

    route: str | None = "/t"

    def __init__(self, messages: list[Message], pace: int) -> None:
        self.messages = messages
        self.pace = pace
        self.sent = 0
        self.closed_with: int | None = None
        self._done = False

    async def receive(self) -> Message | None:
        if self.sent and self.pace and self.sent % self.pace == 0:
            await asyncio.sleep(0)
        if self.sent == len(self.messages):
            return None
        self.sent += 1
        return self.messages[self.sent - 1]

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = code

    def closed_code(self) -> int | None:
        return self.closed_with or 1000

    def keepalive_closed(self) -> bool:
        return False

    async def ping(self) -> None:
        return None


messages = st.lists(
    st.one_of(st.text(max_size=40), st.binary(max_size=40)), min_size=0, max_size=120
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    traffic=messages,
    overflow=st.sampled_from(get_args(Overflow)),
    maxsize=st.integers(1, 8),
    max_bytes=st.one_of(st.none(), st.integers(1, 120)),
    pace=st.integers(0, 5),
    consumer_every=st.integers(0, 4),
    batched=st.booleans(),
    away_at=st.one_of(st.none(), st.integers(1, 20)),
)
def test_every_message_is_delivered_or_counted_and_order_is_kept(
    traffic: list[Message],
    overflow: Overflow,
    maxsize: int,
    max_bytes: int | None,
    pace: int,
    consumer_every: int,
    batched: bool,
    away_at: int | None,
) -> None:
    tagged = [
        m + str(i) if isinstance(m, str) else m + str(i).encode() for i, m in enumerate(traffic)
    ]
    transport = ListTransport(tagged, pace)

    async def run() -> tuple[list[Message], Inbox]:
        got: list[Message] = []
        async with guard(
            transport, maxsize=maxsize, max_bytes=max_bytes, overflow=overflow
        ) as inbox:
            if batched:
                async for batch in inbox.batches(3, 0.0):
                    got.extend(batch)
                    if consumer_every:
                        await asyncio.sleep(0)
            else:
                async for message in inbox:
                    got.append(message)
                    if consumer_every and len(got) % consumer_every == 0:
                        await asyncio.sleep(0)
                    if len(got) == away_at:  # longer than the grace: the receiver reads
                        await asyncio.sleep(GRACE * 3)
        return got, inbox

    got, inbox = asyncio.run(run())
    # Every message the transport gave is delivered or dropped with a reason; all are
    # received unless the guard closed the connection (the rest is then never read).
    assert inbox.delivered == len(got)
    assert inbox.delivered + inbox.dropped == transport.sent
    if transport.closed_with is None:
        assert transport.sent == len(tagged)
    assert sum(inbox.drops.values()) == inbox.dropped
    # Delivered messages keep arrival order (a subsequence of what was sent).
    it = iter(tagged)
    assert all(any(m is s for s in it) for m in got)
    if overflow == "block" and max_bytes is None:
        assert got == tagged
    if overflow == "close" and inbox.dropped:
        assert transport.closed_with in (1013, 1009)
        assert inbox.close_code == transport.closed_with


@pytest.mark.asyncio
async def test_the_block_is_entered_once_and_iterated_inside_only() -> None:
    inbox = guard(ListTransport(["a"], 0), maxsize=2)
    with pytest.raises(RuntimeError, match="outside"):
        inbox.__aiter__()
    async with inbox:
        assert [m async for m in inbox] == ["a"]
    with pytest.raises(RuntimeError, match="once"):
        await inbox.__aenter__()
    with pytest.raises(RuntimeError, match="outside"):
        async for _ in inbox.batches(2, 0.1):
            pass


@pytest.mark.asyncio
async def test_an_idle_connection_is_closed_and_its_stream_ends() -> None:
    class Quiet(ListTransport):
        async def receive(self) -> Message | None:
            if self.closed_with is None:
                await asyncio.sleep(3600)
            return None

    transport = Quiet([], 0)
    async with guard(transport, maxsize=2, idle_timeout=0.05) as inbox:
        assert [m async for m in inbox] == []
    assert (transport.closed_with, inbox.close_code, inbox.close_reason) == (1000, 1000, "idle")


class FedTransport(ListTransport):
    """Messages arrive when the test feeds them; ``abort()`` ends a pending receive."""

    def __init__(self) -> None:
        super().__init__([], 0)
        self.inbound: asyncio.Queue[Message | None] = asyncio.Queue()
        self.aborted = False

    reading = False

    async def receive(self) -> Message | None:
        if self.reading:  # as websockets does
            raise RuntimeError("another task is already receiving")
        self.reading = True
        try:
            message = await self.inbound.get()
        finally:
            self.reading = False
        self.sent += message is not None
        return message

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = code  # a peer that never answers: the pending read goes on

    def abort(self) -> None:
        self.aborted = True
        self.inbound.put_nowait(None)


@pytest.mark.asyncio
async def test_messages_are_read_and_policed_while_the_consumer_is_away() -> None:
    transport = FedTransport()
    seen: list[tuple[int, int]] = []
    got: list[Message] = []

    async def away_with(burst: str) -> None:
        for i in range(5):
            transport.inbound.put_nowait(f"{burst}{i}")
        # Away far longer than the grace: the receiver task reads meanwhile, and the
        # policy applies while the consumer is away.
        await asyncio.sleep(GRACE * 20)
        seen.append((len(inbox), inbox.dropped))

    async def ping_pong(name: str, count: int) -> None:
        for i in range(count):  # the next one only once the last one was handed out
            transport.inbound.put_nowait(f"{name}{i}")
            while got[-1] != f"{name}{i}":
                await asyncio.sleep(0)

    async with guard(transport, maxsize=2, overflow="drop_oldest") as inbox:
        transport.inbound.put_nowait("first")
        async for message in inbox:
            got.append(message)
            if message == "first":
                await away_with("a")
            elif message == "a4":
                feeder = asyncio.create_task(ping_pong("k", 3))
            elif message == "k2":
                await away_with("b")  # ... and is covered again when away again.
                transport.inbound.put_nowait(None)
    await feeder
    assert seen == [(2, 3), (2, 6)]
    assert got == ["first", "a3", "a4", "k0", "k1", "k2", "b3", "b4"]
    assert (inbox.delivered, inbox.drops["overflow"]) == (8, 6)


@pytest.mark.asyncio
async def test_a_consumer_behind_one_short_message_at_a_time_is_covered_too() -> None:
    # Each message takes a fifth of the grace, but the sender is always ahead: every
    # read returns at once from the buffer. The busy period adds up, the receiver task
    # takes over, and the policy applies (instead of the backlog waiting upstream).
    transport = FedTransport()
    for i in range(200):
        transport.inbound.put_nowait(f"m{i}")
    transport.inbound.put_nowait(None)
    got: list[Message] = []
    async with guard(transport, maxsize=5, overflow="drop_oldest") as inbox:
        async for message in inbox:
            got.append(message)
            await asyncio.sleep(GRACE / 5)
    assert inbox.drops["overflow"] > 100
    assert inbox.delivered + inbox.dropped == 200 == len(got) + inbox.dropped
    assert got[-1] == "m199"


@pytest.mark.asyncio
async def test_the_connection_is_read_before_the_consumer_first_asks() -> None:
    transport = FedTransport()
    async with guard(transport, maxsize=3, overflow="drop_oldest") as inbox:
        for i in range(5):
            transport.inbound.put_nowait(f"m{i}")
        await asyncio.sleep(GRACE * 20)  # set-up work before the `async for`
        assert (len(inbox), inbox.dropped) == (3, 2)
        transport.inbound.put_nowait(None)
        assert [m async for m in inbox] == ["m2", "m3", "m4"]


@pytest.mark.asyncio
async def test_two_tasks_may_share_an_inbox() -> None:
    transport = FedTransport()
    got: list[Message] = []

    async def worker(inbox: Inbox) -> None:
        async for message in inbox:
            got.append(message)
            await asyncio.sleep(0)

    async with guard(transport, maxsize=100) as inbox:
        workers = [asyncio.create_task(worker(inbox)) for _ in range(2)]
        for i in range(50):
            transport.inbound.put_nowait(f"m{i}")
            await asyncio.sleep(0)
        transport.inbound.put_nowait(None)
        await asyncio.gather(*workers)
    assert sorted(got, key=lambda m: int(m[1:])) == [f"m{i}" for i in range(50)]
    assert (inbox.delivered, inbox.dropped, inbox.close_reason) == (50, 0, "peer")


@pytest.mark.asyncio
async def test_a_timeout_close_ends_a_pending_read_when_the_peer_never_answers() -> None:
    transport = FedTransport()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with guard(transport, maxsize=2, idle_timeout=0.05) as inbox:
        assert [m async for m in inbox] == []
    took = loop.time() - started
    assert transport.aborted
    assert (transport.closed_with, inbox.close_code, inbox.close_reason) == (1000, 1000, "idle")
    assert took < 5  # idle 0.05 s + the 1 s grace for the closing handshake
