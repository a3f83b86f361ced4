"""The lockstep timing model: the SPEED scheduler itself, ticked at the pace of each tick's slowest node."""

from __future__ import annotations

import pytest

from runtime.core.lockstep_timing import LockstepTiming
from runtime.core.ring_timing import NodeTiming

EVEN = {0: "a", 1: "b", 2: "c"}


def timing(pass_ms: float, head_ms: float = 0.1) -> NodeTiming:
    return NodeTiming({(stage, rows): pass_ms * (1 + 0.1 * (rows - 1)) for stage in range(3) for rows in (1, 2, 4)},
                      head_ms)


def rate(placement, timings, *, speculate: bool, round_trip: float = 0.4, flips=(0.2, 0.1)) -> float:
    return LockstepTiming(placement, timings, lambda node: round_trip, flips, speculate).decode(16, 64)


SAME = {name: timing(1.0) for name in "abc"}


def test_sequential_decoding_takes_a_tick_per_stage_each_a_round_trip_and_a_pass():
    assert rate(EVEN, SAME, speculate=False) == pytest.approx(1000 / (3 * (1.0 + 0.4) + 0.1), rel=0.01)


def test_speculation_runs_every_stage_each_tick_and_flips_cost_ticks():
    sequential = rate(EVEN, SAME, speculate=False)
    assert rate(EVEN, SAME, speculate=True, flips=(0.0, 0.0)) > 2 * sequential
    assert rate(EVEN, SAME, speculate=True, flips=(0.5, 0.5)) < rate(EVEN, SAME, speculate=True, flips=(0.0, 0.0))


def test_a_slow_node_sets_the_pace_of_every_tick_it_works_in():
    slow = {**SAME, "b": timing(3.0)}
    assert rate(EVEN, slow, speculate=True) < 0.6 * rate(EVEN, SAME, speculate=True)
    assert rate({0: "a", 1: "c", 2: "c"}, slow, speculate=True) > rate(EVEN, slow, speculate=True)
