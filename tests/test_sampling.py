import numpy as np
import pytest

from runtime.core.errors import SpeedError
from runtime.core.sampling import SamplingParams, choose_token

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
