"""The scheduling core alone, driven by a synthetic model: no ONNX, no tensors."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.core.scheduler import SpeedScheduler
from tests.ring_simulation import grouped_as_plain_decoding

EOS = 0


class SyntheticRun:
    """Executes plans like a real executor, with a model whose early stages guess wrong on demand.

    The oracle's greedy stream is fixed per sequence. A stage's prediction for position p is the
    oracle's token when everything it attended to is the oracle's, with early stages wrong whenever
    `wrong(seq, p, stage)` says so; with any wrong input it predicts garbage. Caches hold the input
    token written at each position, so a flushed write that is not rolled back shows up. `confidence`
    gives each prediction's probability for the confidence gate (None: every guess is sure).
    """

    def __init__(self, scheduler, streams, wrong, confidence=None):
        self.scheduler, self.streams, self.wrong, self.confidence = scheduler, streams, wrong, confidence
        self.caches = {}  # (seq, stage) -> tokens written at positions 0..len-1
        self.carried = {}  # (seq, start) -> the item's input tokens, travelling with its hidden state
        self.groups = set()  # (start, positions) of every item run

    def grouped_as_plain_decoding(self, prompt_len: int, chunk: int) -> bool:
        return all(grouped_as_plain_decoding(start, length, prompt_len, chunk) for start, length in self.groups)

    def run_tick(self):
        plan = self.scheduler.plan()
        for cut in plan.truncations:
            cache = self.caches.setdefault((cut.seq_id, cut.stage), [])
            del cache[cut.length :]
        predictions, confidence, carried = {}, {}, {}
        for item in plan.items:
            tokens = list(item.tokens) if item.tokens is not None else self.carried[(item.seq_id, item.start)]
            cache = self.caches.setdefault((item.seq_id, item.stage), [])
            assert len(cache) == item.start, "an item must start where its stage's cache ends"
            cache.extend(tokens)
            carried[(item.seq_id, item.start)] = tokens
            self.groups.add((item.start, len(tokens)))
            if item.predict:  # like the executors: no classifier for a prediction nobody reads
                predictions[(item.seq_id, item.start)] = self.predict(item.seq_id, item.stage, cache)
                if self.confidence is not None:
                    confidence[(item.seq_id, item.start)] = self.confidence(item.seq_id, len(cache) - 1, item.stage)
        self.carried = carried
        self.scheduler.apply(predictions, confidence)
        return plan

    def predict(self, seq_id, stage, context):
        stream = self.streams[seq_id]
        position = len(context) - 1
        if context != stream[: len(context)]:
            return 1000 + position  # garbage: a token the oracle never uses
        right = stream[position + 1]
        if stage < self.scheduler.n_stages - 1 and self.wrong(seq_id, position, stage):
            return right + 500  # an early stage's wrong guess
        return right


def oracle_stream(seed, prompt_len, length, eos_at=None):
    rng = random.Random(seed)
    stream = [rng.randrange(1, 400) for _ in range(prompt_len + length + 1)]
    if eos_at is not None and eos_at < length:
        stream[prompt_len + eos_at] = EOS
    return stream


def drawn_confidence(data):
    """confidence(seq, position, stage) for SyntheticRun, drawn once per key like drawn_flips."""
    drawn = {}

    def confidence(seq_id, position, stage):
        return drawn.setdefault((seq_id, position, stage), data.draw(st.sampled_from([0.1, 0.4, 0.7, 1.0])))

    return confidence


def drawn_flips(data, flip_rate):
    """wrong(seq, position, stage) for SyntheticRun, drawn once per key: the same inputs give the same prediction."""
    flips = {}

    def wrong(seq_id, position, stage):
        key = (seq_id, position, stage)
        if key not in flips:
            flips[key] = flip_rate > 0 and data.draw(st.floats(0, 1)) < flip_rate
        return flips[key]

    return wrong


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    n_stages=st.integers(1, 4),
    n_seqs=st.integers(1, 3),
    prompt_len=st.integers(1, 9),
    max_new=st.integers(1, 30),
    chunk=st.integers(1, 5),
    flip_rate=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    eos_at=st.one_of(st.none(), st.integers(0, 30)),
    speculate=st.booleans(),
    gate=st.sampled_from([None, 0.3, 0.5, 0.9, 1.0, "mixed"]),
)
def test_committed_stream_equals_the_oracle_and_flushes_roll_back(data, n_stages, n_seqs, prompt_len, max_new, chunk,
                                                                   flip_rate, eos_at, speculate, gate):
    """gate: every early stage's threshold, the guesses' probabilities drawn at random (None: no gate;
    1.0: the stage never guesses; mixed: stages alternate between never and 0.5)."""
    wrong = drawn_flips(data, flip_rate)
    scheduler = SpeedScheduler(n_stages, prefill_chunk=chunk)
    streams = {s: oracle_stream(s, prompt_len, max_new, eos_at) for s in range(n_seqs)}
    thresholds = {None: (), "mixed": tuple(1.0 if s % 2 else 0.5 for s in range(n_stages - 1))}.get(
        gate, (gate,) * (n_stages - 1))
    for s in range(n_seqs):
        scheduler.add(s, streams[s][:prompt_len], max_new_tokens=max_new, context_length=1000, eos_id=EOS,
                      speculate=speculate, guess_thresholds=thresholds)
    run = SyntheticRun(scheduler, streams, wrong, drawn_confidence(data) if gate is not None else None)
    for _ in range(10_000):
        if not scheduler.active:
            break
        run.run_tick()
    assert not scheduler.active
    for s, seq in scheduler.sequences.items():
        expected = streams[s][prompt_len : prompt_len + max_new]
        if EOS in expected:
            expected = expected[: expected.index(EOS)]
        assert seq.generated == expected
        assert seq.stop_reason == ("eos" if len(expected) < max_new else "length")
        committed = prompt_len + len(seq.generated)  # speculation past the end is freed with the sequence
        for stage in range(n_stages):  # what stays in every cache is the oracle's own text
            cache = run.caches.get((s, stage), [])[:committed]
            assert cache == streams[s][: len(cache)]
    assert run.grouped_as_plain_decoding(prompt_len, chunk)



@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n_stages=st.integers(1, 4),
    prompt_len=st.integers(1, 9),
    max_new=st.integers(1, 25),
    chunk=st.integers(1, 5),
    flip_rate=st.sampled_from([0.0, 0.3, 1.0]),
    loss_rate=st.sampled_from([0.05, 0.2, 0.5]),
    speculate=st.booleans(),
)
def test_lost_caches_are_rebuilt_by_replay_and_the_text_is_unchanged(data, n_stages, prompt_len, max_new, chunk,
                                                                      flip_rate, loss_rate, speculate):
    """A failover: a tick whose results never come back, every cache gone, every sequence rewound."""
    wrong = drawn_flips(data, flip_rate)
    scheduler = SpeedScheduler(n_stages, prefill_chunk=chunk)
    streams = {s: oracle_stream(s, prompt_len, max_new) for s in range(2)}
    for s in streams:
        scheduler.add(s, streams[s][:prompt_len], max_new_tokens=max_new, context_length=1000, eos_id=EOS,
                      speculate=speculate)
    run = SyntheticRun(scheduler, streams, wrong)
    losses = 0
    for _ in range(10_000):
        if not scheduler.active:
            break
        if losses < 5 and data.draw(st.floats(0, 1)) < loss_rate:
            scheduler.plan()  # sent, never answered
            losses += 1
            run.caches, run.carried = {}, {}
            for seq_id in scheduler.sequences:
                scheduler.rewind(seq_id)
            continue
        run.run_tick()
    for s, seq in scheduler.sequences.items():
        assert seq.generated == streams[s][prompt_len : prompt_len + max_new]
        for stage in range(n_stages):
            cache = run.caches.get((s, stage), [])[: prompt_len + len(seq.generated)]
            assert cache == streams[s][: len(cache)]
    assert run.grouped_as_plain_decoding(prompt_len, chunk)  # the replays too: committed tokens alone


@given(prompt_len=st.integers(1, 9), max_new=st.integers(1, 20), done=st.integers(0, 20), n_stages=st.integers(1, 4))
def test_a_resumed_sequence_continues_after_the_tokens_it_already_has(prompt_len, max_new, done, n_stages):
    done = min(done, max_new)
    stream = oracle_stream(3, prompt_len, max_new)
    scheduler = SpeedScheduler(n_stages, prefill_chunk=4)
    seq = scheduler.add(0, stream[:prompt_len], max_new_tokens=max_new, context_length=1000,
                        generated=stream[prompt_len : prompt_len + done])
    run = SyntheticRun(scheduler, {0: stream}, lambda *_: False)
    for _ in range(1000):
        if not scheduler.active:
            break
        run.run_tick()
    assert seq.generated == stream[prompt_len : prompt_len + max_new]
    assert seq.stop_reason == "length"
    assert run.grouped_as_plain_decoding(prompt_len, 4)  # the tokens it already had run alone

def test_the_prompt_is_prefilled_in_chunks_and_decoding_starts_right_after():
    scheduler = SpeedScheduler(3, prefill_chunk=4)
    scheduler.add(0, list(range(1, 11)), max_new_tokens=5, context_length=100)
    run = SyntheticRun(scheduler, {0: oracle_stream(0, 0, 20)}, lambda *_: False)
    run.streams[0][:10] = list(range(1, 11))
    ticks = [[(i.start, i.length, i.stage) for i in run.run_tick().items] for _ in range(4)]
    assert ticks[0] == [(0, 4, 0)]
    assert ticks[1] == [(0, 4, 1), (4, 4, 0)]
    assert ticks[2] == [(0, 4, 2), (4, 4, 1), (8, 2, 0)]
    assert ticks[3] == [(4, 4, 2), (8, 2, 1), (10, 1, 0)]  # the first guess enters stage 0 at once


def test_a_flip_flushes_younger_items_and_truncates_their_stages():
    scheduler = SpeedScheduler(3, prefill_chunk=8)
    stream = oracle_stream(1, 3, 10)
    scheduler.add(0, stream[:3], max_new_tokens=10, context_length=100)
    run = SyntheticRun(scheduler, {0: stream}, lambda seq, position, stage: (position, stage) == (3, 0))
    for _ in range(3):
        run.run_tick()
    # tick 2: position 3 ran stage 0 and guessed wrong; tick 3: it ran stage 1, flipped, flushed position 4
    plan = run.run_tick()
    assert [(c.stage, c.length) for c in plan.truncations] == [(0, 4)]
    assert (4, 1, 0) in [(i.start, i.length, i.stage) for i in plan.items]
    assert scheduler.sequences[0].stats.flips[0] == 1


def test_sequences_share_ticks():
    scheduler = SpeedScheduler(2)
    for s in range(3):
        scheduler.add(s, [5, 6], max_new_tokens=4, context_length=100)
    run = SyntheticRun(scheduler, {s: [5, 6] + oracle_stream(s, 0, 10) for s in range(3)}, lambda *_: False)
    assert {i.seq_id for i in run.run_tick().items} == {0, 1, 2}


def test_without_speculation_one_token_is_in_flight():
    scheduler = SpeedScheduler(3)
    stream = oracle_stream(2, 2, 8)
    scheduler.add(0, stream[:2], max_new_tokens=8, context_length=100, speculate=False)
    run = SyntheticRun(scheduler, {0: stream}, lambda *_: False)
    while scheduler.active:
        assert len(run.run_tick().items) <= 1
    assert scheduler.sequences[0].generated == stream[2:10]
    assert scheduler.sequences[0].stats.ticks == 3 * 8


def gated_decoding(seed, max_new, thresholds, confidence):
    """One sequence of a 3-stage pipeline behind a gate, every guess right: the sequence, once its text is
    checked, and the plan of each tick."""
    scheduler = SpeedScheduler(3)
    stream = oracle_stream(seed, 2, max_new)
    scheduler.add(0, stream[:2], max_new_tokens=max_new, context_length=100, guess_thresholds=thresholds)
    run = SyntheticRun(scheduler, {0: stream}, lambda *_: False, confidence=confidence)
    plans = []
    while scheduler.active:
        plans.append(run.run_tick())
    seq = scheduler.sequences[0]
    assert seq.generated == stream[2 : 2 + max_new] and seq.stats.flushed_steps == 0
    return seq, plans


def test_a_gate_that_holds_every_guess_decodes_like_sequential():
    seq, plans = gated_decoding(2, 8, (0.5, 0.5), lambda *_: 0.4)
    assert all(len(plan.items) <= 1 for plan in plans)
    assert seq.stats.ticks == 3 * 8
    assert seq.stats.held_guesses == 2 * 7  # two per item that has a successor: the prompt and 6 tokens


def test_a_later_stage_sends_the_guess_an_earlier_one_was_unsure_of():
    """Stage 0 unsure, stage 1 sure: each token enters one tick after its predecessor left stage 1."""
    seq, plans = gated_decoding(5, 12, (0.5, 0.5), lambda seq_id, position, stage: 0.9 * stage)
    assert all(len(plan.items) <= 2 for plan in plans)
    assert seq.stats.ticks == 2 * 12 + 1 and seq.stats.held_guesses == 11


def test_a_stage_whose_gate_holds_everything_asks_for_no_prediction():
    """Threshold 1 at stage 0: its items need no classifier; stage 1 guesses and the text is unchanged."""
    seq, plans = gated_decoding(6, 10, (1.0, 0.0), lambda *_: 0.5)
    assert all(item.predict == (item.stage > 0) for plan in plans for item in plan.items)
    assert seq.stats.ticks == 2 * 10 + 1 and seq.stats.held_guesses == 0
    assert seq.stats.checks[0] == 0 and seq.stats.checks[1] > 0  # stage 0 made no guess to compare


def test_a_threshold_for_each_early_stage_is_required():
    with pytest.raises(ValueError, match="one value per early stage"):
        SpeedScheduler(3).add(0, [1], max_new_tokens=2, context_length=10, guess_thresholds=(0.5,))


def test_a_stop_condition_ends_the_sequence_at_that_token():
    scheduler = SpeedScheduler(3)
    stream = oracle_stream(3, 2, 20)
    scheduler.add(0, stream[:2], max_new_tokens=20, context_length=100, should_stop=lambda generated: len(generated) == 5)
    run = SyntheticRun(scheduler, {0: stream}, lambda *_: False)
    while scheduler.active:
        run.run_tick()
    assert scheduler.sequences[0].generated == stream[2:7]
    assert scheduler.sequences[0].stop_reason == "stop"


def test_the_context_bounds_generation():
    scheduler = SpeedScheduler(2)
    stream = oracle_stream(4, 5, 20)
    scheduler.add(0, stream[:5], max_new_tokens=20, context_length=8)
    run = SyntheticRun(scheduler, {0: stream}, lambda *_: False)
    while scheduler.active:
        run.run_tick()
    assert scheduler.sequences[0].generated == stream[5:9]  # positions 5..8: the last fed position is 7
    assert scheduler.sequences[0].stop_reason == "context"


def test_a_removed_sequence_leaves_nothing_pending_for_the_executor():
    """A sequence that ended with a flush still pending (speculated past its stop) is freed elsewhere:
    nothing about it may reach an executor afterwards."""
    scheduler = SpeedScheduler(3)
    stream = oracle_stream(5, 2, 20)
    scheduler.add(0, stream[:2], max_new_tokens=20, context_length=100, should_stop=lambda generated: len(generated) == 3)
    run = SyntheticRun(scheduler, {0: stream}, lambda *_: False)
    while scheduler.active:
        run.run_tick()
    assert scheduler._truncations and scheduler._finished == [0]  # younger guesses were flushed at the stop
    scheduler.remove(0)
    plan = scheduler.plan()
    assert plan.truncations == [] and plan.items == [] and plan.finished == []
