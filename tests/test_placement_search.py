"""Choosing a placement from measured speeds: every candidate scored by the ring's timing model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from runtime.coordinator.auto_placement import PRIOR_CHECKS, calibrated, flip_rates
from runtime.core import placement_search
from runtime.core.bundle import load_bundle
from runtime.core.placement_search import TimingModel, choose, fit_cost, hostable_by, ranked
from runtime.core.ring_timing import NodeTiming


def timing(pass_ms: float, stages=range(3)) -> NodeTiming:
    return NodeTiming({(stage, rows): pass_ms * (1 + 0.1 * (rows - 1)) for stage in stages for rows in (1, 2, 4)}, 0.1)


def model(timings, *, window: int = 8, data_path: str = "ring") -> TimingModel:
    return TimingModel(timings, lambda src, dst: 0.2, (0.2, 0.1), (), window > 0, window, 64, data_path=data_path)


EVEN = {0: "a", 1: "b", 2: "c"}


@pytest.mark.parametrize("data_path", ["ring", "lockstep"])
@pytest.mark.parametrize("window", [0, 8])
def test_a_node_three_times_slower_is_given_no_stage(data_path, window):
    timings = {"a": timing(1.0), "b": timing(3.0), "c": timing(1.0)}
    ring = model(timings, window=window, data_path=data_path)
    best = choose(ring, EVEN, hostable_by(timings, 3))
    assert "b" not in best.placement.values()
    assert best.rate(ring.mode) > 1.2 * ring.score(EVEN).rate(ring.mode)


def test_equal_nodes_keep_the_current_placement():
    timings = {name: timing(1.0) for name in "abc"}
    assert choose(model(timings), EVEN, hostable_by(timings, 3)).placement == EVEN


def test_the_ranking_starts_with_the_given_placement_and_lists_every_other_best_first():
    timings = {"a": timing(1.0), "b": timing(3.0), "c": timing(1.0)}
    ring = model(timings)
    candidates = ranked(ring, EVEN, hostable_by(timings, 3))
    assert candidates[0].placement == EVEN
    assert len(candidates) == 27 and len({tuple(sorted(c.placement.items())) for c in candidates}) == 27
    rates = [c.speculative for c in candidates[1:]]
    assert rates == sorted(rates, reverse=True)


def test_a_node_only_gets_stages_it_measured():
    timings = {"a": timing(1.0, stages=[0]), "b": timing(0.5, stages=[1, 2]), "c": timing(1.0, stages=[2])}
    hostable = hostable_by(timings, 3)
    assert hostable == {0: ["a"], 1: ["b"], 2: ["b", "c"]}
    assert all(c.placement[0] == "a" and c.placement[1] == "b" for c in ranked(model(timings), EVEN, hostable))
    with pytest.raises(ValueError, match="stage 0"):
        ranked(model(timings), EVEN, {**hostable, 0: []})


def test_beyond_the_candidate_limit_a_local_search_still_finds_the_fast_nodes(monkeypatch):
    monkeypatch.setattr(placement_search, "MAX_CANDIDATES", 8)
    timings = {"a": timing(1.0), "b": timing(3.0), "c": timing(1.0)}
    candidates = ranked(model(timings), EVEN, hostable_by(timings, 3))
    assert len(candidates) < 27
    assert "b" not in choose(model(timings), EVEN, hostable_by(timings, 3)).placement.values()


def test_flip_rates_seen_by_the_coordinator_outweigh_the_bundle_s_as_checks_add_up():
    bundle = load_bundle()  # the demo: its training report holds held-out flip rates
    reported, source = bundle.guess_flip_rates()
    assert flip_rates(bundle, [0, 0], [0, 0]) == (reported, source)
    rates, where = flip_rates(bundle, [50, 9], [200, 10])
    assert rates == pytest.approx(((50 + PRIOR_CHECKS * reported[0]) / (200 + PRIOR_CHECKS),
                                   (9 + PRIOR_CHECKS * reported[1]) / (10 + PRIOR_CHECKS)))
    assert where == f"seen by the coordinator: 210 guesses checked, with {source} as {PRIOR_CHECKS} more a boundary"
    assert flip_rates(bundle, [90_000, 10_000], [100_000, 100_000])[0] == pytest.approx((0.9, 0.1), abs=1e-3)


@pytest.mark.parametrize("data_path", ["ring", "lockstep"])
def test_the_cost_of_a_run_is_fitted_to_what_a_placement_measured(data_path):
    timings = {name: timing(1.0) for name in "abc"}
    ring = model(timings, data_path=data_path)
    predicted = ring.rate(EVEN, speculate=False)
    overhead = fit_cost(ring, EVEN, "run_overhead_ms", speculate=False, measured=predicted / 2)
    assert overhead > 0
    fitted = dataclasses.replace(ring, run_overhead_ms=overhead)
    assert fitted.rate(EVEN, speculate=False) == pytest.approx(predicted / 2, rel=0.01)
    assert fit_cost(ring, EVEN, "run_overhead_ms", speculate=False, measured=predicted * 2) == 0.0  # slower already


def test_on_the_ring_speculation_measured_tells_what_a_flushed_guess_s_message_costs():
    timings = {"a": timing(1.0), "b": timing(3.0), "c": timing(1.0)}
    truth = dataclasses.replace(model(timings), run_overhead_ms=1.0, message_ms=1.0)
    sequential, speculative = truth.rate(EVEN, speculate=False), truth.rate(EVEN, speculate=True)
    fitted, fitted_to = calibrated(model(timings), EVEN, sequential, speculative)
    assert fitted_to == "sequential and speculative"
    assert fitted.run_overhead_ms == pytest.approx(1.0, abs=0.05) and fitted.message_ms == pytest.approx(1.0, abs=0.1)
    assert fitted.rate(EVEN, speculate=True) == pytest.approx(speculative, rel=0.03)
    # sequential decoding sends one message a run: what messages beyond cost does not change its time
    assert dataclasses.replace(truth, message_ms=0.0).rate(EVEN, speculate=False) == sequential
    # nothing else measured: the cost of a run alone; a cost no value of which explains the measurement: none
    assert calibrated(model(timings), EVEN, sequential, 0.0)[0].message_ms == 0.0
    assert fit_cost(model(timings), EVEN, "message_ms", speculate=False, measured=sequential) == 0.0


@pytest.mark.parametrize("data_path", ["ring", "lockstep"])
def test_guesses_are_fitted_to_what_the_placement_that_counted_the_flips_counts(data_path):
    # two stages on one node, one slow node: not the alike cluster the rates would otherwise be read on
    timings = {"a": timing(1.0), "b": timing(3.0), "c": timing(1.0)}
    placement = {0: "a", 1: "b", 2: "b"}
    seen = (0.3, 0.4)
    fitted = placement_search.fit_guesses(dataclasses.replace(model(timings, data_path=data_path), flips=seen),
                                          placement)
    simulated = fitted.timing(placement, speculate=True)
    simulated.decode(16, placement_search.FIT_TOKENS)
    assert simulated.counted_flip_rates() == pytest.approx(seen, abs=0.05)


def test_a_plan_before_every_node_reported_names_each_with_its_state_and_what_to_do():
    from runtime.bench.plan import plan
    from runtime.core.cluster_file import load_cluster
    from runtime.core.errors import SpeedError
    from runtime.wire import speed_pb2 as pb

    measured = [pb.PassTime(stage=stage, rows=1, ms=1.0) for stage in range(3)]
    status = pb.ClusterStatusReply(nodes=[
        pb.NodeStatus(name="edge-1", state=pb.NODE_STATE_SERVING, pass_times=measured),
        pb.NodeStatus(name="edge-2", state=pb.NODE_STATE_WAITING),  # a coordinator that has just started
        pb.NodeStatus(name="edge-3", state=pb.NODE_STATE_SERVING, pass_times=measured)])
    with pytest.raises(SpeedError) as raised:
        plan(load_cluster(Path(__file__).parents[1] / "deploy" / "local.yaml"), load_bundle(), status)
    assert str(raised.value).startswith("node(s) edge-2 (waiting) reported no measurements yet;")
    assert "wait until `speed status` shows each serving, and plan again" in str(raised.value)
