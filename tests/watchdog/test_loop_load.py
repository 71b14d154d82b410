"""loopguard.loop_load() and loop_lag(): a loop's recent delay and utilization, and the
delay building up right now, read from a running watchdog's heartbeats."""

from __future__ import annotations

import asyncio
import math

import pytest
from helpers import spin

import loopguard

# The tests run their own watchdogs and hold the loop on purpose.
pytestmark = pytest.mark.loopguard(enabled=False)


@pytest.mark.asyncio
async def test_load_over_a_window_sees_a_held_loop() -> None:
    with loopguard.watch(threshold=0.1, stats=True):
        await asyncio.sleep(0.2)
        quiet = loopguard.loop_load(5)
        assert quiet is not None
        assert quiet.heartbeats >= 3
        spin(0.15)  # hold the loop; the next heartbeat is 150 ms late
        await asyncio.sleep(0.1)
        held = loopguard.loop_load(5)
    assert held is not None
    assert held.delay_max >= 0.12
    assert held.delay_p99 >= 0.12
    # 150 ms of a window well under a second: most arrivals would have waited.
    assert held.wait_p99 >= 0.1
    assert held.delay_p50 < 0.1  # most heartbeats were on time
    assert held.utilization is not None and 0.3 < held.utilization <= 1.0
    assert 0.2 <= held.window <= 5.0


@pytest.mark.asyncio
async def test_the_window_forgets_what_is_older() -> None:
    with loopguard.watch(threshold=0.1):
        spin(0.15)
        await asyncio.sleep(0.6)
        recent = loopguard.loop_load(0.3)
        whole = loopguard.loop_load(5)
    assert recent is not None and whole is not None
    assert whole.delay_max >= 0.12
    assert recent.window <= 0.3 < whole.window
    assert recent.heartbeats < whole.heartbeats
    assert recent.utilization is None  # no stats=True: not measured


@pytest.mark.asyncio
async def test_lag_is_the_delay_building_up_now() -> None:
    with loopguard.watch(threshold=0.1):
        await asyncio.sleep(0.1)
        spin(0.12)
        lag = loopguard.loop_lag()  # the heartbeat has not run since the spin began
        load = loopguard.loop_load(1)
        await asyncio.sleep(0.1)
        after = loopguard.loop_lag()
    assert lag is not None and lag >= 0.08
    assert load is not None and load.lag >= 0.08
    assert after is not None and after < 0.08


@pytest.mark.asyncio
async def test_no_watchdog_no_reading() -> None:
    assert loopguard.current() is None
    assert loopguard.loop_load() is None
    assert loopguard.loop_lag() is None


def test_no_running_loop_no_reading() -> None:
    with loopguard.watch():
        assert loopguard.loop_load() is None
        assert loopguard.loop_lag() is None


@pytest.mark.parametrize("window", [0, -1, 61, math.nan, math.inf, "5", True])
def test_a_bad_window_is_refused_naming_it(window: object) -> None:
    with pytest.raises(ValueError, match="window"):
        loopguard.loop_load(window)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_lag_follows_the_watchdogs_that_come_and_go() -> None:
    with loopguard.watch():
        assert loopguard.loop_lag() is not None
    assert loopguard.loop_lag() is None  # the watchdog it read has stopped
    with loopguard.watch(threshold=0.1):
        await asyncio.sleep(0.05)
        spin(0.12)
        lag = loopguard.loop_lag()
    assert lag is not None and lag >= 0.05


def test_the_wait_percentile_weighs_stalls_by_their_length() -> None:
    from loopguard._watchdog.loopload import wait_percentile

    # Ten 20 ms stalls in 5 s: the loop is held 4 % of the time, so more than 1 % of
    # arrivals wait over 10 ms (an arrival t ms into a stall waits 20 - t ms).
    lates = [0.02] * 10 + [0.0] * 240
    assert wait_percentile(lates, 5.0, 99) == pytest.approx(0.015)
    assert wait_percentile([0.02] * 2 + [0.0] * 248, 5.0, 99) == 0.0  # 0.8 % held
    assert wait_percentile([0.1, 0.001], 5.0, 99) == pytest.approx(0.05)
    assert wait_percentile([], 5.0, 99) == 0.0


@pytest.mark.asyncio
async def test_with_loop_statistics_each_held_stretch_is_measured_whole() -> None:
    # A heartbeat sees only the part of a stretch after it fell due; the iterations
    # themselves say how long the loop was held, whatever the phase.
    with loopguard.watch(threshold=0.5, interval=0.02, stats=True):
        await asyncio.sleep(0.05)
        for pause in (0.003, 0.011, 0.017, 0.007, 0.013):
            spin(0.02)
            await asyncio.sleep(pause)
        load = loopguard.loop_load(5)
    assert load is not None
    assert len([h for h in load.held if h >= 0.02]) == 5, load.held
    assert all(h < 0.2 for h in load.held)


@pytest.mark.asyncio
async def test_without_loop_statistics_held_stretches_come_from_heartbeats() -> None:
    with loopguard.watch(threshold=0.5, interval=0.02):
        await asyncio.sleep(0.05)
        spin(0.1)
        await asyncio.sleep(0.05)
        load = loopguard.loop_load(5)
    assert load is not None
    assert load.held and 0.07 <= load.held[0] <= 0.1 + 0.05
    assert load.held == tuple(sorted(load.held, reverse=True))


def test_the_wait_share_counts_what_one_more_stretch_would_add() -> None:
    load = loopguard.LoopLoad(
        window=5.0,
        heartbeats=250,
        delay_p50=0.0,
        delay_p99=0.0,
        delay_max=0.02,
        utilization=None,
        lag=0.0,
        held=(0.02, 0.02),
        _span=5.0,
    )
    # Two 20 ms stretches in 5 s: 0.72 % of arrivals wait over 2 ms, under a p99 limit;
    # one more would make it 1.08 %, over it.
    assert load.wait_share(0.002) == pytest.approx(0.0072)
    assert load.wait_share(0.002, extra=0.02) == pytest.approx(0.0108)
    assert load.wait_share(0.002, extra=0.001) == pytest.approx(0.0072)  # under the limit
    assert load.wait_share(0.05) == 0.0
