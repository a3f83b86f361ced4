"""`speed quantize`: a 4- or 8-bit copy of a bundle is a bundle like any other, and speculative decoding
of it gives exactly what sequential decoding of it gives, in one process and through a cluster."""

from __future__ import annotations

import json
import math
from pathlib import Path

import onnx
import pytest

from runtime.client import Client
from runtime.core.bundle import DEFAULT_BUNDLE, load_bundle
from runtime.core.errors import SpeedError
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.local.speculative import generate_speculative
from runtime.models.quantize import Quantization, quantize_bundle
from tests.conftest import CLUSTER_PROMPTS, assert_one_line_error, generate_on, run_speed, running_cluster

pytestmark = pytest.mark.training  # its tests train, export, quantize or calibrate a model

SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, seed=3)
# prompts of different lengths (some equal, so their prefills share a call) decoded together
PROMPTS = ["ROMEO: But soft, what light", "To be, or not to be", "KING LEAR:", "Friends, Romans, countrymen"]


@pytest.fixture(scope="module", params=["int4", "int8"])
def quantized(request, tmp_path_factory) -> Path:
    return quantize_bundle(DEFAULT_BUNDLE, tmp_path_factory.mktemp("quantized") / request.param,
                           Quantization(weights=request.param))


def test_a_quantized_bundle_is_not_exported_again(quantized, tmp_path):
    assert_one_line_error(run_speed("export", str(quantized), str(tmp_path / "again")), "is quantized",
                          "export the float32 bundle it was made from again, then quantize that")
    assert not (tmp_path / "again").exists()


def test_a_quantized_bundle_records_how_it_was_made_and_stores_its_matrices_in_few_bits(quantized):
    bundle = load_bundle(quantized)  # every file verified against the manifest
    source = load_bundle()
    made = bundle.manifest["quantization"]
    assert made["weights"] == quantized.name and made["block_size"] == 32
    assert made["source"] == {"name": "demo-4x3", "sha256": source.sha256}
    for graph in {*bundle.stage_graphs, bundle.head_graph}:
        ops = {node.op_type for node in onnx.load(str(graph), load_external_data=False).graph.node}
        assert "MatMulNBits" in ops, graph.name
    size = sum(meta["bytes"] for meta in bundle.manifest["files"].values())
    source_size = sum(meta["bytes"] for meta in source.manifest["files"].values())
    assert size < source_size / (3 if quantized.name == "int4" else 2)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_speculative_decoding_of_a_quantized_bundle_equals_its_sequential_decoding(quantized, sampling):
    bundle = load_bundle(quantized)
    model = open_stage_model(bundle)
    tokenizer = bundle.tokenizer()
    prompts = [tokenizer.encode(prompt).ids for prompt in PROMPTS]
    sequential = [generate_plain(model, p, max_new_tokens=40, eos_id=-1, sampling=sampling).token_ids for p in prompts]
    speculative = generate_speculative(model, prompts, max_new_tokens=40, eos_id=-1, sampling=sampling)
    assert [g.token_ids for g in speculative] == sequential
    # and the text does not depend on how much cache a request reserves (another max_new_tokens)
    longer = generate_plain(model, prompts[1], max_new_tokens=57, eos_id=-1, sampling=sampling).token_ids
    assert longer[:40] == sequential[1]


def test_a_cluster_serves_a_quantized_bundle_with_the_same_text(quantized, tmp_path):
    bundle = load_bundle(quantized)
    model = open_stage_model(bundle)
    tokenizer = bundle.tokenizer()
    with running_cluster(tmp_path, bundle=quantized) as cluster, Client(cluster.endpoint) as client:
        for prompt, sampling in zip(CLUSTER_PROMPTS[:2], [GREEDY, SAMPLED]):
            expected = generate_plain(model, tokenizer.encode(prompt).ids, max_new_tokens=24,
                                      eos_id=bundle.eos_token_id, sampling=sampling).token_ids
            assert generate_on(client, prompt, sampling, max_new_tokens=24).token_ids == expected


def test_quantizing_a_quantized_bundle_is_refused(quantized, tmp_path):
    with pytest.raises(SpeedError, match="quantized already; quantize its float32 source instead"):
        quantize_bundle(quantized, tmp_path / "twice", Quantization())
    assert not (tmp_path / "twice").exists()


def test_the_torch_backend_refuses_a_quantized_bundle_in_one_sentence(quantized):
    with pytest.raises(SpeedError, match="is quantized and the torch backend runs float32 bundles only"):
        open_stage_model(load_bundle(quantized), backend="torch")


def test_exit_training_refuses_a_quantized_bundle_in_one_sentence(quantized):
    assert_one_line_error(run_speed("train-exit", str(quantized), "--steps", "1"), "is quantized",
                          "the float32 bundle it was made from")


def test_speed_quantize_writes_a_bundle_and_refuses_bad_settings(tmp_path):
    out = tmp_path / "demo-int4"
    result = run_speed("quantize", str(DEFAULT_BUNDLE), str(out), "--weights", "int4")
    assert result.returncode == 0, result.stderr
    assert f"wrote bundle {out}" in result.stdout
    assert json.loads((out / "manifest.json").read_text())["quantization"]["weights"] == "int4"

    assert_one_line_error(run_speed("quantize", str(DEFAULT_BUNDLE), str(out)),
                          "already exists; choose another directory or pass --force")
    assert_one_line_error(run_speed("quantize", str(DEFAULT_BUNDLE), str(tmp_path / "x"), "--block-size", "48"),
                          "--block-size must be a power of two")
    assert not (tmp_path / "x").exists()

    bench = run_speed("bench", "--reference", "--bundle", str(out), "--new-tokens", "4", "--repeats", "1", "--json")
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    assert "torch" not in report["tokens_per_s"] and report["onnx_over_torch"] is None  # no torch twin
    assert report["bundle_bytes"] == sum(meta["bytes"] for meta in load_bundle(out).manifest["files"].values())

    agreement = run_speed("bench", "--agreement", str(DEFAULT_BUNDLE), "--bundle", str(out), "--new-tokens", "3",
                          "--json")
    assert agreement.returncode == 0, agreement.stderr
    report = json.loads(agreement.stdout)
    assert (report["bundle"], report["source"], report["prompts"]) == ("demo-4x3-int4", "demo-4x3", 20)
    assert 0 <= report["identical_sequences"] <= 20 and 0 <= report["agreeing_fraction"] <= 1
    loss, uniform = report["held_out_loss"], math.log(load_bundle().config.vocab_size)
    # trained: far below guessing (the demo reads its 32 held-out windows at about half of it)
    assert 0 < loss["source"] < 0.6 * uniform and 0 < loss["bundle"] < 0.6 * uniform
    assert loss["windows"] == 32
    assert_one_line_error(run_speed("bench", "--agreement", str(DEFAULT_BUNDLE)), "--agreement SOURCE needs --bundle")
