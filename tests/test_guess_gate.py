"""The confidence gate: `speed calibrate` chooses a bundle's thresholds from held-out text; behind any
gate speculative decoding keeps the sequential text and sends fewer guesses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime.core.bundle import load_bundle
from runtime.core.sampling import SamplingParams
from runtime.local.backends import open_stage_model
from runtime.local.speculative import generate_speculative
from runtime.models.guess_gate import choose_threshold
from tests.conftest import assert_one_line_error, run_speed

PROMPTS = ["ROMEO. But soft, what light", "Enter a Messenger.", "KING HENRY. Once more unto the breach"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A copy of the demo bundle with its gate chosen by `speed calibrate`."""
    bundle = tmp_path_factory.mktemp("gate") / "demo"
    shutil.copytree(load_bundle().path, bundle)
    result = run_speed("calibrate", str(bundle), "--windows", "8")
    assert result.returncode == 0, result.stderr
    assert "guess thresholds per early stage" in result.stdout
    return bundle


def test_calibrate_writes_a_threshold_per_early_stage_with_its_report(calibrated):
    bundle = load_bundle(calibrated)  # every file still matches its hash
    gate = bundle.manifest["guess_gate"]
    assert len(bundle.guess_thresholds) == bundle.config.n_stages - 1
    assert all(0 <= t <= 1 for t in bundle.guess_thresholds)
    assert gate["report"]["positions"] == 8 * 128
    for stage in gate["report"]["stages"]:
        assert stage["agreement_sent"] is None or stage["agreement_sent"] >= stage["agreement"]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=40, seed=5)],
                         ids=["greedy", "sampled"])
def test_every_gate_keeps_the_sequential_text_and_a_higher_one_holds_more_back(sampling):
    bundle = load_bundle()
    model = open_stage_model(bundle, threads=1)
    prompts = [bundle.tokenizer().encode(p).ids for p in PROMPTS]
    kwargs = {"max_new_tokens": 48, "eos_id": -1, "sampling": sampling}
    sequential = generate_speculative(model, prompts, speculate=False, **kwargs)
    held, ticks = [], []
    for threshold in (0.0, 0.2, 0.6, 0.95, 1.0):
        thresholds = (threshold,) * (bundle.config.n_stages - 1) if threshold else ()
        runs = generate_speculative(model, prompts, guess_thresholds=thresholds, **kwargs)
        assert [g.token_ids for g in runs] == [g.token_ids for g in sequential], threshold
        held.append(sum(g.stats.held_guesses for g in runs))
        ticks.append(sum(g.stats.ticks for g in runs))
    assert held[0] == 0 and held[0] < held[1] < held[2] < held[3]
    assert held[4] == 0 and ticks[4] == sum(g.stats.ticks for g in sequential)  # threshold 1: no guess at all


def test_reference_takes_the_bundles_gate_and_an_override(calibrated):
    plain = json.loads(run_speed("reference", "--json", "--max-new-tokens", "24", "ROMEO:").stdout)
    held = {}
    for threshold in (None, "0.9", "0"):
        extra = ["--guess-threshold", threshold] if threshold else []
        result = run_speed("reference", "--speculate", "--json", "--bundle", str(calibrated), "--max-new-tokens", "24",
                           *extra, "ROMEO:")
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["token_ids"] == plain["token_ids"]
        held[threshold] = out["stats"]["held_guesses"]
    assert held["0"] == 0 and held["0.9"] > held[None]


def test_a_threshold_outside_zero_to_one_is_one_sentence():
    result = run_speed("reference", "--speculate", "--guess-threshold", "1.5", "ROMEO:")
    assert_one_line_error(result, "--guess-threshold", "at most 1")


def test_the_threshold_is_where_guesses_stop_agreeing_often_enough():
    confidence = np.linspace(0.01, 1, 1000)
    agreed = confidence > 0.4  # guesses below 0.4 are always wrong, above always right
    assert choose_threshold(confidence, agreed, 0.5) == pytest.approx(0.4, abs=0.06)
    assert choose_threshold(confidence, np.ones(1000, bool), 0.5) == 0.0  # all agree: never hold back
    assert choose_threshold(confidence, np.zeros(1000, bool), 0.5) == 1.0  # none do: hold every guess
