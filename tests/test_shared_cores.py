"""Nodes on one machine share its cores: fair shares, when work ends, and what the timing models make of it."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.core.lockstep_timing import LockstepTiming
from runtime.core.ring_timing import NodeTiming, RingTiming
from runtime.core.shared_cores import fair_speeds, shared_ends

EVEN = {0: "a", 1: "b", 2: "c"}


def test_cores_go_fairly_and_a_node_wanting_less_than_its_share_gets_all_it_wants():
    assert fair_speeds({"a": 1, "b": 1}, 2) == {"a": 1.0, "b": 1.0}
    assert fair_speeds({"a": 1, "b": 1, "c": 1}, 2) == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 2 / 3})
    # a node under a third of a core's quota keeps its third; the two others split what is left
    assert fair_speeds({"slow": 1 / 3, "a": 1, "b": 1}, 2) == pytest.approx({"slow": 1.0, "a": 5 / 6, "b": 5 / 6})


def test_work_sharing_one_core_ends_when_the_core_has_done_it():
    assert shared_ends({"a": (3.0, 1.0), "b": (3.0, 1.0)}, 1) == pytest.approx({"a": 6.0, "b": 6.0})
    # the short one ends first, at half speed; the long one then runs alone
    assert shared_ends({"a": (1.0, 1.0), "b": (3.0, 1.0)}, 1) == pytest.approx({"a": 2.0, "b": 4.0})
    assert shared_ends({"a": (1.0, 1.0), "b": (3.0, 1.0)}, 2) == pytest.approx({"a": 1.0, "b": 3.0})


works = st.dictionaries(st.sampled_from("abcde"), st.tuples(st.floats(0.01, 50), st.floats(0.1, 4)), min_size=1)


@given(works, st.floats(0.5, 8))
def test_shared_work_ends_no_sooner_than_alone_nor_than_the_cores_can_do_it(works, cores):
    ends = shared_ends(works, cores)
    assert ends.keys() == works.keys()
    for name, (ms, _) in works.items():
        assert ends[name] >= ms * (1 - 1e-9)
        if sum(want for _, want in works.values()) <= cores:
            assert ends[name] == pytest.approx(ms)  # room for everyone: nobody slows
    # the cores never do more than they have: core-milliseconds of work over cores
    assert max(ends.values()) >= sum(ms * min(wants, cores) for ms, wants in works.values()) / cores * (1 - 1e-9)


def node(pass_ms: float, *, machine: str = "", cores: float = 0.0, used: float = 1.0) -> NodeTiming:
    return NodeTiming({(stage, rows): pass_ms * (1 + 0.1 * (rows - 1)) for stage in range(3) for rows in (1, 2, 4)},
                      0.1, machine=machine, machine_cores=cores, cores_used=used)


def apart() -> dict[str, NodeTiming]:
    return {name: node(1.0) for name in "abc"}


def together(cores: float) -> dict[str, NodeTiming]:
    return {name: node(1.0, machine="m", cores=cores) for name in "abc"}


def ring_rate(timings, *, window: int) -> float:
    return RingTiming(EVEN, timings, lambda src, dst: 0.2, (0.2, 0.1), window).decode(16, 64)


def lockstep_rate(timings, *, speculate: bool) -> float:
    return LockstepTiming(EVEN, timings, lambda node: 0.4, (0.2, 0.1), speculate).decode(16, 64)


def test_on_the_ring_speculation_gains_less_where_the_stages_share_fewer_cores_than_they_are():
    # sequential decoding runs one pass at a time: sharing a machine costs nothing
    assert ring_rate(together(1), window=0) == pytest.approx(ring_rate(apart(), window=0), rel=0.01)
    # speculation overlaps passes, which one core cannot run at once
    assert ring_rate(together(1), window=8) < 0.75 * ring_rate(apart(), window=8)
    assert ring_rate(together(1), window=8) < ring_rate(together(2), window=8) < ring_rate(apart(), window=8)
    assert ring_rate(together(3), window=8) == pytest.approx(ring_rate(apart(), window=8))


def test_in_lockstep_a_tick_of_nodes_sharing_a_machine_lasts_until_its_cores_did_their_work():
    assert lockstep_rate(together(1), speculate=False) == pytest.approx(lockstep_rate(apart(), speculate=False))
    assert lockstep_rate(together(1), speculate=True) < 0.75 * lockstep_rate(apart(), speculate=True)
    assert lockstep_rate(together(3), speculate=True) == pytest.approx(lockstep_rate(apart(), speculate=True))


def test_nodes_on_other_machines_or_on_an_accelerator_do_not_slow_each_other():
    others = {name: node(1.0, machine=name, cores=1) for name in "abc"}
    assert ring_rate(others, window=8) == pytest.approx(ring_rate(apart(), window=8))
    accelerated = {name: dataclasses.replace(timing, cores_used=0.0) for name, timing in together(1).items()}
    assert ring_rate(accelerated, window=8) == pytest.approx(ring_rate(apart(), window=8))

