"""The bounded queue under every policy: nothing lost silently, order kept, bounds honoured."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loopguard_integrations._queue import (
    OVERFLOW_POLICIES,
    BoundedQueue,
    QueueClosed,
    check_bounds,
)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"maxsize": 0}, "maxsize"),
        ({"maxsize": -3}, "maxsize"),
        ({"maxsize": 1.5}, "maxsize"),
        ({"maxsize": True}, "maxsize"),
        ({"maxsize": 4, "max_bytes": 0}, "max_bytes"),
        ({"maxsize": 4, "max_bytes": -1}, "max_bytes"),
        ({"maxsize": 4, "overflow": "drop"}, "overflow"),
    ],
)
def test_bad_bounds_are_refused_naming_the_argument(kwargs: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        BoundedQueue(**kwargs)  # type: ignore[arg-type]


def test_check_bounds_accepts_every_policy() -> None:
    for policy in OVERFLOW_POLICIES:
        check_bounds(1, None, policy)
    assert OVERFLOW_POLICIES == ("block", "drop_oldest", "drop_newest", "close")


@pytest.mark.asyncio
async def test_drop_oldest_keeps_the_newest_and_counts_the_rest() -> None:
    dropped: list[tuple[int, str]] = []
    q: BoundedQueue[int] = BoundedQueue(
        maxsize=2, overflow="drop_oldest", on_drop=lambda i, r: dropped.append((i, r))
    )
    for i in range(5):
        assert await q.put(i)
    assert [q.get_nowait(), q.get_nowait()] == [3, 4]
    assert dropped == [(0, "overflow"), (1, "overflow"), (2, "overflow")]
    assert (q.delivered, q.dropped, q.drops["overflow"]) == (2, 3, 3)


@pytest.mark.asyncio
async def test_drop_newest_keeps_the_first() -> None:
    q: BoundedQueue[int] = BoundedQueue(maxsize=2, overflow="drop_newest")
    results = [await q.put(i) for i in range(4)]
    assert results == [True, True, False, False]
    assert [q.get_nowait(), q.get_nowait()] == [0, 1]
    assert q.dropped == 2


@pytest.mark.asyncio
async def test_close_policy_flags_overflow_and_too_large() -> None:
    q: BoundedQueue[str] = BoundedQueue(maxsize=1, max_bytes=10, overflow="close")
    assert await q.put("a", 1)
    assert q.full_since is not None
    assert not await q.put("b", 1)
    assert q.overflowed == "overflow"
    q2: BoundedQueue[str] = BoundedQueue(maxsize=5, max_bytes=10, overflow="close")
    assert not await q2.put("huge", 11)
    assert (q2.overflowed, q2.drops["too_large"]) == ("too_large", 1)


@pytest.mark.asyncio
async def test_too_large_is_dropped_under_block_instead_of_waiting_for_ever() -> None:
    q: BoundedQueue[str] = BoundedQueue(maxsize=5, max_bytes=10)
    assert not await asyncio.wait_for(q.put("huge", 11), 5)
    assert q.drops["too_large"] == 1
    assert q.overflowed is None


@pytest.mark.asyncio
async def test_block_waits_for_room_and_close_wakes_the_waiting_producer() -> None:
    q: BoundedQueue[int] = BoundedQueue(maxsize=1)
    await q.put(1)
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(2)
    waiting = asyncio.ensure_future(q.put(2))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert await q.get() == 1
    assert await asyncio.wait_for(waiting, 5) is True
    blocked = asyncio.ensure_future(q.put(3))
    await asyncio.sleep(0.01)
    q.close()
    with pytest.raises(QueueClosed):
        await asyncio.wait_for(blocked, 5)
    # What was queued before the close is still delivered, then the stream ends.
    assert [item async for item in q] == [2]
    with pytest.raises(QueueClosed):
        await q.get()
    with pytest.raises(QueueClosed):
        await q.put(4)


@pytest.mark.asyncio
async def test_close_wakes_a_waiting_consumer() -> None:
    q: BoundedQueue[int] = BoundedQueue(maxsize=3)
    getter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0.01)
    q.close()
    with pytest.raises(QueueClosed):
        await asyncio.wait_for(getter, 5)


@pytest.mark.asyncio
async def test_max_bytes_bounds_the_queue_and_time_in_queue_is_reported() -> None:
    waits: list[float] = []
    q: BoundedQueue[bytes] = BoundedQueue(
        maxsize=100, max_bytes=10, overflow="drop_newest", on_get=waits.append
    )
    assert await q.put(b"12345", 5)
    assert await q.put(b"12345", 5)
    assert not await q.put(b"1", 1)
    assert q.nbytes == 10
    await asyncio.sleep(0.02)
    q.get_nowait()
    assert q.nbytes == 5
    assert q.last_wait >= 0.015
    assert waits == [q.last_wait]
    with pytest.raises(ValueError, match="nbytes"):
        await q.put(b"", -1)


@pytest.mark.asyncio
async def test_discard_counts_what_was_left() -> None:
    q: BoundedQueue[int] = BoundedQueue(maxsize=5)
    for i in range(3):
        await q.put(i)
    assert q.discard() == 3
    assert (len(q), q.dropped, q.drops["discarded"], q.nbytes) == (0, 3, 3, 0)


@pytest.mark.asyncio
async def test_pass_through_counts_without_queueing_and_applies_the_size_bound() -> None:
    waits: list[float] = []
    q: BoundedQueue[str] = BoundedQueue(
        maxsize=1, max_bytes=4, overflow="close", on_get=waits.append
    )
    assert q.pass_through("ab", 2) is True
    assert (q.delivered, len(q), q.nbytes, waits) == (1, 0, 0, [0.0])
    assert q.pass_through("abcdef", 6) is False  # can never fit: dropped as under offer()
    assert (q.drops["too_large"], q.overflowed) == (1, "too_large")
    await q.put("x", 1)
    with pytest.raises(RuntimeError, match="overtake"):
        q.pass_through("y", 1)
    q.close()
    with pytest.raises(QueueClosed):
        q.pass_through("z", 1)


@pytest.mark.asyncio
async def test_batches_gather_what_arrives_within_the_wait() -> None:
    q: BoundedQueue[int] = BoundedQueue(maxsize=100)
    for i in range(5):
        await q.put(i)
    assert await q.get_batch(3, 0.0) == [0, 1, 2]
    assert await q.get_batch(10, 0.01) == [3, 4]
    q.close()
    assert await q.get_batch(10, 0.01) == []
    with pytest.raises(ValueError, match="max_items"):
        await q.get_batch(0, 1)
    with pytest.raises(ValueError, match="max_wait"):
        await q.get_batch(1, -1)


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from(OVERFLOW_POLICIES),
    maxsize=st.integers(1, 8),
    max_bytes=st.none() | st.integers(1, 64),
    sizes=st.lists(st.integers(0, 80), min_size=0, max_size=120),
    consumer_every=st.integers(1, 5),
    consumer_takes=st.integers(0, 4),
)
def test_every_item_is_delivered_dropped_or_queued_and_order_is_kept(
    policy: str,
    maxsize: int,
    max_bytes: int | None,
    sizes: list[int],
    consumer_every: int,
    consumer_takes: int,
) -> None:
    async def scenario() -> None:
        q: BoundedQueue[int] = BoundedQueue(
            maxsize=maxsize,
            max_bytes=max_bytes,
            overflow=policy,  # type: ignore[arg-type]
        )
        got: list[int] = []

        async def consume(n: int) -> None:
            for _ in range(n):
                try:
                    got.append(q.get_nowait())
                except asyncio.QueueEmpty:
                    return

        for sent, size in enumerate(sizes):
            if policy == "block" and not q._fits(size) and (max_bytes is None or size <= max_bytes):
                # A blocked producer waits for the consumer: drain one to make room.
                producer = asyncio.ensure_future(q.put(sent, size))
                while not producer.done():
                    await consume(1)
                    await asyncio.sleep(0)
                await producer
            else:
                await q.put(sent, size)
            assert len(q) <= maxsize
            assert max_bytes is None or q.nbytes <= max_bytes
            if sent % consumer_every == 0:
                await consume(consumer_takes)
        queued = len(q)
        q.close()
        got.extend([item async for item in q])
        assert q.delivered + q.dropped == len(sizes)
        assert q.delivered == len(got)
        assert got == sorted(got)
        assert queued + (q.delivered - queued) + q.dropped == len(sizes)
        assert q.dropped == sum(q.drops.values())
        if max_bytes is not None:
            assert q.drops["too_large"] == sum(1 for s in sizes if s > max_bytes)

    asyncio.run(scenario())
