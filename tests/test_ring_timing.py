"""The ring timing model: the real ring state machines on simulated nodes whose passes take what was measured."""

from __future__ import annotations

import pytest

from runtime.core.ring_timing import NodeTiming, RingTiming

FLIPS = (0.2, 0.1)
NEW_TOKENS = 64


def timing(pass_ms: float, head_ms: float = 0.1) -> NodeTiming:
    """A node whose pass takes pass_ms for one row and 10% more for each further row."""
    return NodeTiming({(stage, rows): pass_ms * (1 + 0.1 * (rows - 1)) for stage in range(3) for rows in (1, 2, 4)},
                      head_ms)


def rate(placement, timings, *, window: int, link: float = 0.2, flips=FLIPS, thresholds=(), message_ms=0.0) -> float:
    return RingTiming(placement, timings, lambda src, dst: link, flips, window, thresholds,
                      message_ms=message_ms).decode(16, NEW_TOKENS)


EVEN = {0: "a", 1: "b", 2: "c"}
SAME = {name: timing(1.0) for name in "abc"}


def test_sequential_decoding_takes_every_pass_and_hop_in_turn():
    # per token: three passes, the classifier on the last stage, and three hops (two onward, the commit back)
    assert rate(EVEN, SAME, window=0) == pytest.approx(1000 / (3 * 1.0 + 0.1 + 3 * 0.2), rel=0.02)


def test_running_ahead_on_guesses_overlaps_the_stages():
    assert rate(EVEN, SAME, window=8) > 1.5 * rate(EVEN, SAME, window=0)
    assert rate(EVEN, SAME, window=8, flips=(0.0, 0.0)) > rate(EVEN, SAME, window=8, flips=(0.5, 0.5))


def test_a_gate_that_sends_no_guess_is_sequential_decoding():
    assert rate(EVEN, SAME, window=8, thresholds=(1.0, 1.0)) == pytest.approx(rate(EVEN, SAME, window=0), rel=0.02)


def test_a_slow_node_holds_the_ring_back_and_moving_its_stage_away_helps():
    slow = {**SAME, "b": timing(3.0)}
    assert rate(EVEN, slow, window=8) < 0.7 * rate(EVEN, SAME, window=8)
    assert rate({0: "a", 1: "a", 2: "c"}, slow, window=8) > rate(EVEN, slow, window=8)


def test_messages_beyond_one_a_run_cost_their_receiver_more_under_a_cpu_quota():
    # sequentially every message brings a run's input; speculating, most of the head's hops are flushed unrun
    assert rate(EVEN, SAME, window=0, message_ms=2.0) == rate(EVEN, SAME, window=0)
    assert rate(EVEN, SAME, window=8, message_ms=2.0) < 0.9 * rate(EVEN, SAME, window=8)
    quota = NodeTiming({(0, 1): 1.0}, 0.1, machine="m", machine_cores=2, cores_used=0.25)
    assert quota.message_ms(1.0) == 4.0 and timing(1.0).message_ms(1.0) == 1.0


def test_pass_times_between_and_beyond_the_measured_row_counts_are_interpolated():
    node = NodeTiming({(0, 1): 1.0, (0, 2): 1.5, (0, 4): 2.5}, 0.1)
    assert node.run_ms(0, 3) == pytest.approx(2.0) and node.run_ms(0, 8) == pytest.approx(4.5)
    # a measured row count is its measurement, even where the measurements are not in line (under a CPU quota)
    noisy = NodeTiming({(0, 1): 17.7, (0, 2): 14.0, (0, 4): 22.9}, 0.1)
    assert [noisy.run_ms(0, rows) for rows in (1, 2, 4)] == [17.7, 14.0, 22.9]
    with pytest.raises(ValueError, match="stage 1"):
        node.run_ms(1, 1)

