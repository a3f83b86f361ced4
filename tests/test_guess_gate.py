"""The confidence gate: `speed calibrate` chooses a bundle's thresholds from held-out text; behind any
gate speculative decoding keeps the sequential text and sends fewer guesses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime.core.bundle import DEFAULT_BUNDLE, load_bundle
from runtime.core.sampling import SamplingParams
from runtime.executor.onnx_session import create_session
from runtime.local.backends import open_stage_model
from runtime.local.speculative import generate_speculative
from runtime.models.guess_gate import choose_threshold, frequent_tokens
from tests.conftest import CLUSTER_PROMPTS, assert_one_line_error, generate_on, run_speed, running_cluster

pytestmark = pytest.mark.training  # its tests train, export, quantize or calibrate a model

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


@pytest.fixture(scope="module")
def guess_head_bundle(tmp_path_factory):
    """A copy of the demo bundle calibrated with a guess head over a quarter of its vocabulary, twice (the
    second calibration finds the same head and keeps its files)."""
    bundle = tmp_path_factory.mktemp("guess-head") / "demo"
    shutil.copytree(load_bundle().path, bundle)
    for _ in range(2):
        result = run_speed("calibrate", str(bundle), "--windows", "4", "--guess-vocabulary", "0.25")
        assert result.returncode == 0, result.stderr
        assert "guesses score the 1024 most frequent tokens" in result.stdout
    return bundle


def test_a_guess_head_scores_the_most_frequent_tokens_and_is_cheaper(guess_head_bundle):
    bundle = load_bundle(guess_head_bundle)  # every file, the guess head's too, matches its hash
    vocabulary = bundle.guess_vocabulary()
    assert len(vocabulary) == bundle.manifest["guess_head"]["size"] == bundle.config.vocab_size // 4
    assert (np.diff(vocabulary) > 0).all() and 0 <= vocabulary[0] and vocabulary[-1] < bundle.config.vocab_size
    assert {bundle.manifest["guess_head"]["graph"], bundle.manifest["guess_head"]["tokens"]} <= bundle.files_for([1])
    report = bundle.manifest["guess_gate"]["report"]
    assert report["guess_vocabulary"] == 1024 and all("agreement_full_head" in stage for stage in report["stages"])
    model = open_stage_model(bundle, threads=1)
    hidden = np.random.default_rng(0).standard_normal((3, bundle.config.d_model)).astype(np.float32)
    logits, index = model.classify_guesses(hidden)
    assert logits.shape == (3, 1024) and (index == logits.argmax(-1)).all()
    full, _ = model.classify(hidden)
    assert np.allclose(logits, full[:, vocabulary], atol=1e-4)  # the same scores, for fewer tokens


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=40, seed=5)],
                         ids=["greedy", "sampled"])
def test_guesses_from_a_guess_head_keep_the_sequential_text(guess_head_bundle, sampling):
    sequential, speculative = decoded_both_ways(load_bundle(guess_head_bundle), sampling)
    assert [g.token_ids for g in speculative] == [g.token_ids for g in sequential]
    assert sum(g.stats.ticks for g in speculative) < sum(g.stats.ticks for g in sequential)  # guesses were right often


def decoded_both_ways(bundle, sampling: SamplingParams, **speculation) -> tuple[list, list]:
    """PROMPTS decoded by the bundle in one process, sequentially and speculatively."""
    model = open_stage_model(bundle, threads=1)
    prompts = [bundle.tokenizer().encode(p).ids for p in PROMPTS]
    kwargs = {"max_new_tokens": 48, "eos_id": -1, "sampling": sampling}
    return (generate_speculative(model, prompts, speculate=False, **kwargs),
            generate_speculative(model, prompts, **speculation, **kwargs))


@pytest.fixture(scope="module")
def quantized_guess_head_bundle(tmp_path_factory):
    """An int4 copy of the demo bundle calibrated by `speed calibrate`, with a guess head."""
    from runtime.models.quantize import Quantization, quantize_bundle

    bundle = quantize_bundle(DEFAULT_BUNDLE, tmp_path_factory.mktemp("quantized") / "demo-int4", Quantization())
    result = run_speed("calibrate", str(bundle), "--windows", "4", "--guess-vocabulary", "0.25")
    assert result.returncode == 0, result.stderr
    return bundle


def test_a_quantized_bundles_guess_head_is_cut_from_its_classifiers_own_blocks(quantized_guess_head_bundle):
    bundle = load_bundle(quantized_guess_head_bundle)
    vocabulary = bundle.guess_vocabulary()
    assert len(vocabulary) == bundle.config.vocab_size // 4 and len(bundle.guess_thresholds) == 2
    model = open_stage_model(bundle, threads=1)
    hidden = np.random.default_rng(0).standard_normal((3, bundle.config.d_model)).astype(np.float32)
    logits, index = model.classify_guesses(hidden)
    assert np.array_equal(logits, model.classify(hidden)[0][:, vocabulary])  # the classifier's own scores
    assert (index == logits.argmax(-1)).all()


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=40, seed=5)],
                         ids=["greedy", "sampled"])
def test_a_calibrated_quantized_bundle_keeps_the_sequential_text(quantized_guess_head_bundle, sampling):
    bundle = load_bundle(quantized_guess_head_bundle)
    sequential, speculative = decoded_both_ways(bundle, sampling, guess_thresholds=bundle.guess_thresholds)
    assert [g.token_ids for g in speculative] == [g.token_ids for g in sequential]


def test_the_guess_head_is_loaded_at_the_first_guess_only(quantized_guess_head_bundle, monkeypatch):
    """A node whose gate holds every guess (the fast kind's) never holds the guess head in memory."""
    import runtime.executor.onnx_stage_model as stage_model

    loaded = []
    monkeypatch.setattr(stage_model, "create_session", lambda path, **options: loaded.append(path.name) or
                        create_session(path, **options))
    bundle = load_bundle(quantized_guess_head_bundle)
    guess_head = bundle.guess_head_graph.name
    model = stage_model.OnnxStageModel(bundle, threads=1)
    prompts = [bundle.tokenizer().encode(p).ids for p in PROMPTS]
    kwargs = {"max_new_tokens": 8, "eos_id": -1}
    held = generate_speculative(model, prompts, guess_thresholds=(1.0, 1.0), **kwargs)
    assert guess_head not in loaded
    sent = generate_speculative(model, prompts, guess_thresholds=(0.0, 0.0), **kwargs)
    assert loaded.count(guess_head) == 1 and [g.token_ids for g in sent] == [g.token_ids for g in held]


def test_released_classifiers_open_again_at_the_next_classification_with_the_same_results(
        quantized_guess_head_bundle, monkeypatch):
    """What a node not running the last stage does after timing them: their memory goes, their results stay."""
    import runtime.executor.onnx_stage_model as stage_model

    loaded = []
    monkeypatch.setattr(stage_model, "create_session", lambda path, **options: loaded.append(path.name) or
                        create_session(path, **options))
    bundle = load_bundle(quantized_guess_head_bundle)
    model = stage_model.OnnxStageModel(bundle, threads=1)
    hidden = np.random.default_rng(1).standard_normal((2, bundle.config.d_model)).astype(np.float32)
    assert not model.classifier_open
    before = [*model.classify(hidden), *model.classify_guesses(hidden)]
    assert model.classifier_open
    model.release_classifiers()
    assert not model.classifier_open
    after = [*model.classify(hidden), *model.classify_guesses(hidden)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert loaded.count(bundle.head_graph.name) == 2 and loaded.count(bundle.guess_head_graph.name) == 2


def test_frequent_tokens_rank_by_count_then_id():
    assert frequent_tokens([5, 5, 5, 2, 2, 9], vocab_size=10, share=0.3).tolist() == [2, 5, 9]
    assert frequent_tokens([5, 5, 5, 2, 2, 9], vocab_size=10, share=0.5).tolist() == [0, 1, 2, 5, 9]  # unseen by id


def test_a_ring_cluster_guessing_with_a_guess_head_gives_the_reference_text(guess_head_bundle, reference, tmp_path):
    from runtime.client import Client

    with running_cluster(tmp_path, bundle=guess_head_bundle, extra_top_keys="data_path: ring\n") as cluster, \
            Client(cluster.endpoint) as client:
        for prompt in CLUSTER_PROMPTS:
            for sampling in (SamplingParams(), SamplingParams(temperature=0.8, seed=3)):
                result = generate_on(client, prompt, sampling, guess_threshold=0.0)
                assert result.token_ids == reference(prompt, sampling), (prompt, sampling)
