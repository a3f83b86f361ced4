"""The ring's per-node state machines, driven by a simulation with random flips, link delays and
compute times: the committed text is always sequential decoding's."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.core.ring import Commit, Correction, Hop, RingError, RingMachine
from runtime.core.run_ahead import RunAheadPrice
from tests.ring_simulation import Simulation, grouped_as_plain_decoding, reference_decode


def layouts(n_stages: int):
    """Every way to spread the stages over nodes, a node hosting any non-empty set of them."""
    return st.lists(st.integers(0, n_stages - 1), min_size=n_stages, max_size=n_stages).map(
        lambda owners: [tuple(s for s in range(n_stages) if owners[s] == o) for o in sorted(set(owners))])


@st.composite
def simulations(draw):
    n_stages = draw(st.integers(1, 4))
    return dict(
        n_stages=n_stages, hosting=draw(layouts(n_stages)), window=draw(st.integers(0, 8)),
        flip=draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]), min_size=n_stages, max_size=n_stages)),
        thresholds=tuple(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n_stages - 1,
                                       max_size=n_stages - 1))),
        prefill_chunk=draw(st.integers(1, 5)), run_ahead=draw(st.sampled_from([0.0, 0.3, 0.9, 1.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
        sequences=draw(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 30)), min_size=1, max_size=6)))


@settings(max_examples=300, deadline=None)
@given(simulations())
def test_committed_text_is_sequential_decoding(case):
    rng = random.Random(case["seed"])
    sim = Simulation(case["n_stages"], case["hosting"], case["window"], case["flip"], case["thresholds"], rng,
                     prefill_chunk=case["prefill_chunk"], run_ahead=case["run_ahead"])
    expected = {}
    for seq_id, (prompt_length, new_tokens) in enumerate(case["sequences"]):
        prompt = [rng.randrange(1000) for _ in range(prompt_length)]
        expected[seq_id] = reference_decode(case["n_stages"], prompt, new_tokens)
        sim.open(seq_id, prompt, new_tokens)
    sim.run()
    assert sim.committed == expected
    prompts = {seq_id: prompt_length for seq_id, (prompt_length, _) in enumerate(case["sequences"])}
    for seq_id, stage, start, positions in sim.runs:
        assert grouped_as_plain_decoding(start, positions, prompts[seq_id], case["prefill_chunk"]), \
            f"sequence {seq_id} stage {stage} ran positions {start}-{start + positions - 1} in one pass"


def test_a_wrong_guess_is_corrected_by_the_next_stage_and_its_timeline_dropped():
    head, second = RingMachine((0,), 3), RingMachine((1,), 3)
    for node in (head, second):
        node.open(7, [5, 6], last_position=10, window=4)
    [prefill] = head.take_runs()
    head.ran(prefill, prediction=40, confidence=0.9)  # stage 0 guesses 40 at position 2
    assert head.drain() == [Hop(7, 0, 1, 0, (5, 6), 2)]
    [guess] = head.take_runs()
    assert (guess.start, guess.tokens) == (2, (40,))
    second.receive(Hop(7, 0, 1, 0, (5, 6), 2))
    [run] = second.take_runs()
    second.ran(run, prediction=41, confidence=0.9)  # stage 1 predicts 41 at position 2
    second.receive(Hop(7, 0, 1, 2, (40,), 2))
    second.receive(Hop(7, 0, 1, 3, (12,), 2))
    assert second.take_runs() == []  # both hops of the wrong timeline dropped
    assert second.drain()[-1] == Correction(7, 0, 2, 41, 1)
    head.ran(guess, prediction=12, confidence=0.9)
    head.drain()
    head.receive(Correction(7, 0, 2, 41, 1))
    head.receive(Correction(7, 0, 2, 43, 2))  # about the same position of the old timeline: stale
    [fixed] = head.take_runs()
    assert (fixed.gen, fixed.start, fixed.tokens) == (1, 2, (41,))


def test_positions_run_again_after_a_late_correction_run_one_at_a_time_as_plain_decoding_ran_them():
    """A correction about a guess that was right reaches the head after the guess was committed: the head
    sends the committed positions again, each alone (in one pass their keys would get other bits)."""
    head = RingMachine((0,), 3, prefill_chunk=8)
    head.open(7, [5, 6], last_position=10, window=4)
    [prefill] = head.take_runs()
    head.ran(prefill, prediction=40, confidence=0.9)
    [first] = head.take_runs()
    head.ran(first, prediction=41, confidence=0.9)
    [second] = head.take_runs()
    head.ran(second, prediction=42, confidence=0.9)
    head.drain()
    head.receive(Commit(7, 2, 40))
    head.receive(Commit(7, 3, 41))
    head.receive(Correction(7, 0, 2, 99, 1))  # stage 1 was wrong about position 2, and the guess right
    starts = []
    while (runs := head.take_runs()) and len(starts) < 3:
        [run] = runs
        starts.append((run.start, run.tokens))
        head.ran(run, prediction=38 + run.end, confidence=0.9)  # the same predictions as the first time
    assert starts == [(2, (40,)), (3, (41,)), (4, (42,))]


def test_a_replay_runs_the_prompt_in_chunks_and_every_committed_token_alone():
    head = RingMachine((0,), 2, prefill_chunk=4)
    head.open(1, [1, 2, 3, 4, 5, 6, 20, 21, 22], last_position=12, window=0, prompt_length=6)
    groups = []
    while runs := head.take_runs():
        [run] = runs
        groups.append(run.tokens)
        head.ran(run)
    assert groups == [(1, 2, 3, 4), (5, 6), (20,), (21,), (22,)]
    with pytest.raises(RingError, match="a prompt of 10 tokens does not fit a prefill of 9"):
        RingMachine((0,), 2).open(2, list(range(9)), last_position=12, prompt_length=10)


def test_sequential_decoding_waits_for_each_commit():
    head = RingMachine((0,), 2)
    head.open(1, [3], last_position=5, window=0)
    [prefill] = head.take_runs()
    head.ran(prefill, prediction=None)
    head.drain()
    assert head.take_runs() == []
    head.receive(Commit(1, 1, 9))
    [run] = head.take_runs()
    assert (run.start, run.tokens, run.predict) == (1, (9,), False)


def test_the_head_stops_running_ahead_after_an_unsure_guess_until_it_is_committed():
    head = RingMachine((0,), 3, run_ahead=0.5)
    head.open(1, [3], last_position=20, window=8)
    [prefill] = head.take_runs()
    head.ran(prefill, prediction=10, confidence=0.3)  # the guess at position 1: the first always runs
    [first] = head.take_runs()
    head.ran(first, prediction=11, confidence=0.9)  # position 2 would build on the unsure guess: wait
    assert head.take_runs() == []
    head.receive(Commit(1, 1, 10))  # the unsure guess was right
    [second] = head.take_runs()
    assert (second.start, second.tokens) == (2, (11,))
    head.ran(second, prediction=12, confidence=0.9)  # sure: runs on
    [third] = head.take_runs()
    assert (third.start, third.tokens) == (3, (12,))


def test_a_run_ahead_pays_when_the_commit_it_saves_waiting_for_outlasts_the_pass_it_may_waste():
    price = RunAheadPrice()
    assert price.threshold == 0.0  # nothing measured yet: always run
    price.ran(0.001)
    price.waited(0.003)
    assert price.threshold == pytest.approx(0.25)  # fast links: a chain must be right a quarter of the time
    for _ in range(100):
        price.waited(0.099)
    assert price.threshold == pytest.approx(0.01, abs=1e-3)  # slow links: nearly every chain runs
