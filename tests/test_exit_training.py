"""`speed train-exit`: exits trained into a bundle (one layer with its own cache, low-rank, affine)
change the guesses only, never the text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.launcher import LocalCluster
from runtime.client import Client
from runtime.core.bundle import load_bundle
from runtime.core.config import EXIT_KINDS
from runtime.core.sampling import SamplingParams
from runtime.core.scheduler import SpeedScheduler
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.executor.tick_executor import TickExecutor
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.local.speculative import generate_speculative
from runtime.models.decoder import SpeedDecoder
from runtime.models.torch_backend import model_from_bundle
from tests.conftest import assert_one_line_error, run_speed, write_cluster
from tests.gguf_writer import source_config, write_gguf

pytestmark = pytest.mark.training  # its tests train, export, quantize or calibrate a model

PROMPTS = ["To be, or not to be", "Enter a Messenger.", "def main():", "O Romeo, Romeo!"]
SMALL = ["--steps", "60", "--lr", "0.01", "--rank", "8", "--train-windows", "8", "--held-out-windows", "4"]


@pytest.fixture(scope="module")
def imported(tiny_bundle, tmp_path_factory):
    """A random 5-layer Llama imported from GGUF: its predictions vary, unlike a barely trained model's."""
    directory = tmp_path_factory.mktemp("imported")
    tokenizer_json = json.loads((tiny_bundle / "tokenizer.json").read_text())
    torch.manual_seed(1)
    model = SpeedDecoder(source_config(tokenizer_json))
    write_gguf(directory / "random.gguf", model, tokenizer_json)
    bundle = directory / "random"
    assert run_speed("import", "gguf", str(directory / "random.gguf"), str(bundle), "--stages", "3",
                     "--no-calibrate").returncode == 0
    return bundle


@pytest.fixture(scope="module")
def with_exits(imported, tmp_path_factory):
    """with_exits(kind): the imported bundle given exits of that kind, trained once per kind for the module
    (tests read these bundles; one that changes a bundle trains a copy)."""
    bundles = {}

    def train(kind: str) -> Path:
        if kind not in bundles:
            bundle = tmp_path_factory.mktemp(kind) / "bundle"
            shutil.copytree(imported, bundle)
            result = run_speed("train-exit", str(bundle), "--kind", kind, *SMALL)
            assert result.returncode == 0, result.stderr
            assert "held-out flip rate per boundary" in result.stdout
            bundles[kind] = bundle
        return bundles[kind]

    return train


@pytest.fixture(scope="module", params=EXIT_KINDS)
def trained(request, with_exits):
    """The imported bundle given exits of one kind."""
    return with_exits(request.param)


def test_the_exits_are_written_into_the_bundle_with_their_report(trained):
    bundle = load_bundle(trained)  # every file still matches its hash
    spec = bundle.exits
    assert spec["stages"] == [0, 1] and spec["kind"] in EXIT_KINDS
    report = spec["report"]
    assert len(report["flip_rate_per_boundary_before"]) == len(report["flip_rate_per_boundary_after"]) == 2
    assert report["flip_rate_per_boundary_after"] != report["flip_rate_per_boundary_before"]  # guesses changed
    assert len(bundle.guess_thresholds) == 2  # the gate is chosen again for the new exits
    if spec["kind"] == "layer":
        assert sorted(bundle.exit_layer_graphs()) == [0, 1] and not bundle.exit_maps()
    else:
        exit_map = bundle.exit_maps()[0]
        assert (exit_map.up if spec["kind"] == "low-rank" else exit_map.bias).any()  # trained away from the start


def test_guesses_change_and_the_text_does_not(trained):
    bundle = load_bundle(trained)
    model = open_stage_model(bundle)
    tokenizer = bundle.tokenizer()
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    for sampling in [SamplingParams(), SamplingParams(temperature=0.9, top_k=50, seed=3)]:
        with_exits = generate_speculative(model, prompts, max_new_tokens=32, eos_id=-1, sampling=sampling)
        plain_runs = generate_speculative(model, prompts, max_new_tokens=32, eos_id=-1, sampling=sampling,
                                          plain_guesses=True)
        for prompt, exited, plain in zip(prompts, with_exits, plain_runs):
            expected = generate_plain(model, prompt, max_new_tokens=32, eos_id=-1, sampling=sampling).token_ids
            assert exited.token_ids == plain.token_ids == expected
        assert [g.stats.flips_per_boundary for g in with_exits] != [g.stats.flips_per_boundary for g in plain_runs]


def test_a_layer_exit_runs_for_guesses_only_and_its_cache_rolls_back_with_the_stage(with_exits):
    """After speculative decoding with flushes, each exit cache holds exactly what the exit computes over
    the committed text from position 0: no entry of a flushed guess survives."""
    bundle = load_bundle(with_exits("layer"))
    model = open_stage_model(bundle)
    calls = []
    run_exit_layer = model.run_exit_layer
    model.run_exit_layer = lambda stage, *args: calls.append(stage) or run_exit_layer(stage, *args)
    prompt = bundle.tokenizer().encode(PROMPTS[0]).ids
    executor = TickExecutor(model, slots=1, capacity=64)
    scheduler = SpeedScheduler(3, prefill_chunk=4)
    executor.open(0)
    scheduler.add(0, prompt, max_new_tokens=24, context_length=64, eos_id=-1)
    while scheduler.active:
        result = executor.run(scheduler.plan())
        scheduler.apply(result.predictions, result.confidence)
    seq = scheduler.sequences[0]
    assert seq.stats.flushed_steps > 0 and set(calls) == {0, 1}
    text = torch.tensor([prompt + seq.generated])
    hidden = [h.detach().numpy() for h in model_from_bundle(bundle).stage_hiddens(text)]
    exit_layers = OnnxStageModel(bundle, threads=0)
    for stage in (0, 1):
        length = executor.exit_cache.lengths[executor.exit_row(0, stage)]
        assert length == executor.cache_length(0, stage)
        window = exit_layers.new_cache(rows=1, capacity=text.shape[1], layers=1)
        exit_layers.run_exit_layer(stage, hidden[stage], window, slice(0, 1))
        np.testing.assert_allclose(executor.exit_cache.position_keys()[0, executor.exit_row(0, stage), :, :length],
                                   window.position_keys()[0, 0, :, :length], rtol=1e-3, atol=1e-4)
    calls.clear()
    generate_speculative(model, [prompt], max_new_tokens=8, eos_id=-1, plain_guesses=True)
    assert calls == []


def test_training_another_kind_replaces_the_exits_and_leaves_no_stale_file(with_exits, tmp_path):
    """Layer exits (a graph per stage) replaced by maps (one file), and the other way round."""
    bundle_dir = tmp_path / "again"
    shutil.copytree(with_exits("layer"), bundle_dir)
    for kind in ("affine", "layer"):
        old = load_bundle(bundle_dir).exit_files()
        assert run_speed("train-exit", str(bundle_dir), "--kind", kind, *SMALL, "--seed", "1").returncode == 0
        new = load_bundle(bundle_dir).exit_files()
        assert load_bundle(bundle_dir).exits["kind"] == kind
        assert not set(new) & set(old) and not any((bundle_dir / name).exists() for name in old)
        assert sorted(p.name for p in bundle_dir.glob("exit_*")) == sorted(new)


def test_a_cluster_gives_the_same_text_with_and_without_the_exits(trained, tmp_path, state_dir):
    bundle = load_bundle(trained)
    ids = bundle.tokenizer().encode(PROMPTS[0]).ids
    expected = generate_plain(open_stage_model(bundle), ids, max_new_tokens=24, eos_id=-1).token_ids
    with LocalCluster(write_cluster(tmp_path, bundle=trained)) as cluster, Client(cluster.endpoint) as client:
        for plain_guesses in (False, True):
            result = client.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True, plain_guesses=plain_guesses)
            assert result.result().token_ids == expected


def test_a_missing_bundle_is_refused_in_one_line(tmp_path):
    assert_one_line_error(run_speed("train-exit", str(tmp_path / "missing"), *SMALL), "does not exist")


def test_an_unknown_kind_is_refused_in_one_line(imported):
    assert_one_line_error(run_speed("train-exit", str(imported), "--kind", "deep"), "--kind", "layer")
