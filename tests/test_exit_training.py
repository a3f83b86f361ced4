"""`speed train-exit`: exit adapters trained into a bundle change the guesses only, never the text."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deploy.launcher import LocalCluster
from runtime.client import Client
from runtime.core.bundle import load_bundle
from runtime.core.sampling import SamplingParams
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.local.speculative import generate_speculative
from runtime.models.decoder import SpeedDecoder
from tests.conftest import assert_one_line_error, run_speed, write_cluster
from tests.gguf_writer import source_config, write_gguf

PROMPTS = ["To be, or not to be", "Enter a Messenger.", "def main():", "O Romeo, Romeo!"]
SMALL = ["--steps", "60", "--lr", "0.01", "--rank", "8", "--train-windows", "8", "--held-out-windows", "4"]


@pytest.fixture(scope="module")
def adapted(tiny_bundle, tmp_path_factory):
    """A random 5-layer Llama imported from GGUF (its predictions vary, unlike a barely trained model's),
    then given exit adapters."""
    directory = tmp_path_factory.mktemp("adapted")
    tokenizer_json = json.loads((tiny_bundle / "tokenizer.json").read_text())
    torch.manual_seed(1)
    model = SpeedDecoder(source_config(tokenizer_json))
    write_gguf(directory / "random.gguf", model, tokenizer_json)
    bundle = directory / "random"
    assert run_speed("import", "gguf", str(directory / "random.gguf"), str(bundle), "--stages", "3").returncode == 0
    result = run_speed("train-exit", str(bundle), *SMALL)
    assert result.returncode == 0, result.stderr
    assert "held-out flip rate per boundary" in result.stdout
    return bundle


def test_the_adapters_are_written_into_the_bundle_with_their_report(adapted):
    bundle = load_bundle(adapted)  # every file still matches its hash
    spec = bundle.manifest["exit_adapters"]
    assert spec["stages"] == [0, 1] and spec["rank"] == 8
    assert len(spec["report"]["flip_rate_per_boundary_before"]) == len(spec["report"]["flip_rate_per_boundary_after"]) == 2
    down, up = bundle.exit_adapters()[0]
    assert down.shape == (bundle.config.d_model, 8) and up.shape == (8, bundle.config.d_model)
    assert up.any()  # trained away from the identity it starts at
    assert len(bundle.guess_thresholds) == 2  # the gate is chosen again for the new exits


def test_guesses_change_and_the_text_does_not(adapted):
    bundle = load_bundle(adapted)
    model = open_stage_model(bundle)
    tokenizer = bundle.tokenizer()
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    for sampling in [SamplingParams(), SamplingParams(temperature=0.9, top_k=50, seed=3)]:
        adapted_runs = generate_speculative(model, prompts, max_new_tokens=32, eos_id=-1, sampling=sampling)
        plain_runs = generate_speculative(model, prompts, max_new_tokens=32, eos_id=-1, sampling=sampling,
                                          plain_guesses=True)
        for prompt, with_adapters, without in zip(prompts, adapted_runs, plain_runs):
            expected = generate_plain(model, prompt, max_new_tokens=32, eos_id=-1, sampling=sampling).token_ids
            assert with_adapters.token_ids == without.token_ids == expected


def test_the_adapters_change_what_early_stages_guess(adapted):
    report = load_bundle(adapted).manifest["exit_adapters"]["report"]
    assert report["flip_rate_per_boundary_after"] != report["flip_rate_per_boundary_before"]
    assert report["flip_rate_per_boundary_after"][0] < report["flip_rate_per_boundary_before"][0]


def test_training_again_replaces_the_adapters_and_leaves_no_stale_file(adapted, tmp_path):
    bundle_dir = tmp_path / "again"
    shutil.copytree(adapted, bundle_dir)
    old = load_bundle(bundle_dir).manifest["exit_adapters"]["file"]
    assert run_speed("train-exit", str(bundle_dir), *SMALL, "--seed", "1").returncode == 0
    new = load_bundle(bundle_dir).manifest["exit_adapters"]["file"]
    assert new != old and not (bundle_dir / old).exists()
    assert sorted(p.name for p in bundle_dir.glob("exit_adapters-*")) == [new]


def test_a_cluster_gives_the_same_text_with_and_without_the_adapters(adapted, tmp_path, state_dir):
    bundle = load_bundle(adapted)
    ids = bundle.tokenizer().encode(PROMPTS[0]).ids
    expected = generate_plain(open_stage_model(bundle), ids, max_new_tokens=24, eos_id=-1).token_ids
    with LocalCluster(write_cluster(tmp_path, bundle=adapted)) as cluster, Client(cluster.endpoint) as client:
        for plain_guesses in (False, True):
            result = client.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True, plain_guesses=plain_guesses)
            assert result.result().token_ids == expected


def test_a_missing_bundle_is_refused_in_one_line(tmp_path):
    assert_one_line_error(run_speed("train-exit", str(tmp_path / "missing"), *SMALL), "does not exist")
