"""The histogram sampler of the receive guard: every message below the budget, about
the budget above it, and a random share, so the distribution is kept."""

from __future__ import annotations

import random

from loopguard_integrations._wsmetrics import Sampler


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _second(sampler: Sampler, clock: Clock, messages: int) -> int:
    """Feed ``messages`` evenly over one second; how many were kept."""
    kept = 0
    start = clock.now
    for i in range(messages):
        clock.now = start + i / messages
        kept += sampler.take()
    clock.now = start + 1.0
    return kept


def test_below_the_budget_every_message_is_kept() -> None:
    clock = Clock()
    sampler = Sampler(100, clock=clock, rand=random.Random(1).random)
    assert [_second(sampler, clock, 80) for _ in range(5)] == [80] * 5


def test_above_the_budget_about_the_budget_is_kept_then_all_again() -> None:
    clock = Clock()
    sampler = Sampler(100, clock=clock, rand=random.Random(2).random)
    first = _second(sampler, clock, 1000)
    assert first == 200  # the first window knows no rate yet: capped at twice the budget
    steady = [_second(sampler, clock, 1000) for _ in range(20)]
    assert 90 <= sum(steady) / len(steady) <= 110, steady
    assert max(steady) <= 200
    # Quiet again: the window after a quiet one keeps everything.
    _second(sampler, clock, 10)
    assert _second(sampler, clock, 10) == 10


def test_the_kept_share_is_random_not_periodic() -> None:
    """A stride would keep every 10th message and miss a pattern of period 10."""
    clock = Clock()
    sampler = Sampler(100, clock=clock, rand=random.Random(3).random)
    _second(sampler, clock, 1000)
    kept_positions = []
    start = clock.now
    for i in range(1000):
        clock.now = start + i / 1000
        if sampler.take():
            kept_positions.append(i % 10)
    assert len(set(kept_positions)) == 10  # every phase of a period-10 pattern is seen
