"""The synthetic guesses the timing models decode with, and the draws that make a data path count the flip
rates a cluster saw."""

from __future__ import annotations

import pytest

from runtime.core.flip_fit import counted_rates, knows_better
from runtime.core.synthetic_guesses import Guesses, true_token


def test_early_stages_agree_on_a_wrong_guess_until_one_knows_better():
    right_away, at_stage_1, at_the_end = Guesses((0.0, 0.0)), Guesses((1.0, 1.0)), Guesses((0.0, 1.0))
    for position in range(50):
        right = true_token(position)
        assert [right_away.prediction(stage, position) for stage in range(3)] == [right] * 3
        assert at_stage_1.prediction(0, position) != right and at_stage_1.prediction(1, position) == right
        assert at_the_end.prediction(0, position) == at_the_end.prediction(1, position) != right  # wrong together
        assert at_the_end.prediction(2, position) == right  # the last stage is always right
    sometimes = Guesses((0.5, 0.5), seed=3)
    wrong = [p for p in range(400) if sometimes.prediction(0, p) != true_token(p)]
    assert 0.65 < len(wrong) / 400 < 0.85  # right only where neither later stage knew better: 1/4


@pytest.mark.parametrize(("data_path", "seen"), [("ring", (0.2, 0.1)), ("ring", (0.5, 0.75)),
                                                 ("lockstep", (0.2, 0.1)), ("lockstep", (0.3, 0.5))])
def test_the_fitted_draws_make_the_data_path_count_the_rates_seen(data_path, seen):
    settings = {"data_path": data_path, "window": 8, "thresholds": (), "prefill_chunk": 64}
    shares = knows_better(seen, **settings)
    assert counted_rates(shares, **settings) == pytest.approx(seen, abs=0.05)


def test_without_guesses_nothing_is_fitted():
    assert knows_better((0.3, 0.6), data_path="ring", window=0, thresholds=(), prefill_chunk=64) == (0.3, 0.6)
