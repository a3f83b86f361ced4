import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.core.errors import SpeedError
from runtime.core.sampling import SamplingParams, choose_from_top, choose_token, gumbel_noise, kth_largest, nucleus

LOGITS = np.random.default_rng(0).normal(size=200).astype(np.float32)


def test_greedy_is_the_argmax():
    assert choose_token(LOGITS, SamplingParams(), position=5) == int(np.argmax(LOGITS))


def test_a_draw_depends_only_on_seed_and_position():
    params = SamplingParams(temperature=1.0, seed=42)
    draws = [choose_token(LOGITS, params, position) for position in range(50)]
    assert draws == [choose_token(LOGITS, params, position) for position in range(50)]
    assert len(set(draws)) > 10
    assert draws != [choose_token(LOGITS, SamplingParams(temperature=1.0, seed=43), p) for p in range(50)]


def test_draws_follow_the_distribution():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0])
    params = SamplingParams(temperature=0.8, seed=9)
    draws = np.bincount([choose_token(logits, params, position) for position in range(20_000)], minlength=5)
    expected = np.exp(logits / 0.8) / np.exp(logits / 0.8).sum()
    np.testing.assert_allclose(draws / draws.sum(), expected, atol=0.01)


def test_close_distributions_drawn_at_one_position_mostly_agree():
    """What makes a sampled speculative guess worth sending: the early stage's draw from a distribution
    close to the last stage's is usually the same token."""
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=1.0, seed=3)
    nearby = LOGITS + rng.normal(scale=0.1, size=LOGITS.shape).astype(np.float32)
    agree = np.mean([choose_token(LOGITS, params, p) == choose_token(nearby, params, p) for p in range(2000)])
    assert agree > 0.9


def test_top_k_and_top_p_restrict_the_choice():
    top5 = set(np.argsort(-LOGITS)[:5].tolist())
    assert {choose_token(LOGITS, SamplingParams(temperature=2.0, top_k=5), p) for p in range(200)} <= top5
    assert choose_token(LOGITS, SamplingParams(temperature=1.0, top_k=1), 3) == int(np.argmax(LOGITS))
    assert choose_token(LOGITS, SamplingParams(temperature=1.0, top_p=1e-6), 3) == int(np.argmax(LOGITS))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": -0.1}, "temperature must be 0"),
        ({"top_p": 0.0}, "top-p must be in"),
        ({"top_p": 1.5}, "top-p must be in"),
        ({"top_k": -1}, "top-k must be"),
        ({"top_k": 2**31}, "top-k must be a whole number from 0"),  # the wire carries it as int32
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_out_of_range_parameters_are_refused(settings, message):
    with pytest.raises(SpeedError, match=message):
        SamplingParams(**settings)


def test_the_noise_is_numpys_gumbel_noise_but_for_rounding():
    for position in range(5):
        ours = gumbel_noise(11, position, 5000)
        numpys = np.random.default_rng([11, position]).gumbel(size=5000)
        np.testing.assert_allclose(ours, numpys, rtol=0, atol=2e-15)


def top(logits: np.ndarray, count: int, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The `count` largest logits and their ids, ties among them broken by `order` (a permutation)."""
    ids = order[np.argsort(-logits[order], kind="stable")][:count]
    return logits[ids], ids


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_draw_from_the_largest_logits_is_the_full_draw_or_undecided(data):
    """What a GPU node draws from the largest logits it fetched, instead of every logit, is the very token the
    full row gives, whatever the ties, filters, temperature, or guess head's tokens; or it says it cannot tell."""
    size = data.draw(st.integers(2, 120))
    # few distinct values, so that ties at every boundary are common
    logits = (np.array(data.draw(st.lists(st.integers(-6, 6), min_size=size, max_size=size)), np.float32) * 0.75
              + np.float32(data.draw(st.sampled_from([0.0, 0.3]))) * np.arange(size, dtype=np.float32) / size)
    params = SamplingParams(temperature=data.draw(st.sampled_from([0.25, 0.7, 1.0, 1.9])),
                            top_k=data.draw(st.integers(0, size + 2)),
                            top_p=data.draw(st.sampled_from([1.0, 1.0, 0.95, 0.6])), seed=data.draw(st.integers(0, 99)))
    guess_head = data.draw(st.booleans())
    vocab_size = size + 7 if guess_head else None
    token_ids = np.sort(np.random.default_rng(size).choice(vocab_size, size, replace=False)) if guess_head else None
    order = np.random.default_rng(data.draw(st.integers(0, 99))).permutation(size)
    top_logits, top_ids = top(logits, data.draw(st.integers(1, size)), order)
    position = data.draw(st.integers(0, 500))
    drawn = choose_from_top(top_logits, top_ids, size, params, position, token_ids=token_ids, vocab_size=vocab_size)
    if drawn is not None:
        assert drawn == choose_token(logits, params, position, token_ids=token_ids, vocab_size=vocab_size)


def test_the_largest_logits_decide_a_top_k_draw_and_a_peaked_one_but_never_top_p_alone():
    logits = np.random.default_rng(4).normal(size=5000).astype(np.float32)
    logits[:3] += 20  # a peaked row, as a language model's usually is
    top_logits, top_ids = top(logits, 64, np.arange(5000))
    for position in range(50):
        for params in (SamplingParams(temperature=1.0, top_k=40, seed=position),
                       SamplingParams(temperature=0.8, top_k=63, top_p=0.9, seed=position),
                       SamplingParams(temperature=1.0, seed=position)):
            assert choose_from_top(top_logits, top_ids, 5000, params, position) == choose_token(logits, params, position)
        assert choose_from_top(top_logits, top_ids, 5000, SamplingParams(temperature=1.0, top_p=0.9), position) is None
        assert choose_from_top(top_logits, top_ids, 5000, SamplingParams(temperature=1.0, top_k=64), position) is None


def sorted_nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The nucleus by sorting every token, as it was defined."""
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    inside = np.zeros(probs.shape, dtype=bool)
    inside[order[mass_before < top_p]] = True
    return inside


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 6000), spread=st.sampled_from([0.5, 2.0, 6.0]), levels=st.sampled_from([0, 3, 40]),
       top_p=st.floats(0.01, 0.999), k=st.integers(1, 6000), seed=st.integers(0, 2**32 - 1))
def test_the_nucleus_and_the_kth_largest_are_those_of_sorting_every_token(size, spread, levels, top_p, k, seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(scale=spread, size=size)
    if levels:  # ties everywhere
        scores = np.round(scores * levels) / levels
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    assert np.array_equal(nucleus(probs, top_p), sorted_nucleus(probs, top_p))
    k = min(k, size)
    assert kth_largest(scores, k) == np.partition(scores, -k)[-k]


def test_every_draw_at_a_position_gets_that_position_s_noise_unchanged():
    """Each stage draws the same position with the same noise, kept once made: no draw may change it."""
    params = SamplingParams(temperature=0.9, seed=5)
    rng = np.random.default_rng(1)
    early, late = (rng.standard_normal(300).astype(np.float32) for _ in range(2))
    for logits in (early, late, early, late):
        drawn = int(np.argmax(logits.astype(np.float64) / 0.9 + gumbel_noise(5, 7, 300)))
        assert choose_token(logits, params, 7) == drawn
