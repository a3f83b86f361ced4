"""`speed import gguf` on a small Llama model written here as GGUF the way llama.cpp writes it
(query/key rows permuted, some tensors quantized), then served by every decoder, a cluster included."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from deploy.launcher import LocalCluster
from runtime.client import Client, Unavailable
from runtime.core.bundle import load_bundle
from runtime.core.config import ModelConfig
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.local.speculative import generate_speculative
from runtime.models.decoder import SpeedDecoder
from runtime.models.torch_backend import model_from_bundle
from tests.conftest import assert_one_line_error, run_speed, write_cluster
from tests.gguf_writer import TYPES, source_config, write_gguf

pytestmark = pytest.mark.training  # its tests train, export, quantize or calibrate a model

PROMPTS = ["To be, or not to be", "Enter a Messenger.", "My lord, 12 ships", "O Romeo, Romeo!"]
# a file whose every layer matrix is in 4-bit blocks, as llama.cpp's Q4_0 and Q4_1 files are
FOUR_BIT = {**{part: GGMLQuantizationType.Q4_1 for part in ("attn_q", "attn_k", "attn_v", "ffn_up", "ffn_down")},
            "attn_output": GGMLQuantizationType.Q4_0, "ffn_gate": GGMLQuantizationType.Q4_0,
            "token_embd": GGMLQuantizationType.Q8_0}


@pytest.fixture(scope="module")
def source(tiny_bundle, tmp_path_factory):
    """A random 5-layer Llama written as GGUF, and what the import should hold."""
    tokenizer_json = json.loads((tiny_bundle / "tokenizer.json").read_text())
    torch.manual_seed(0)
    model = SpeedDecoder(source_config(tokenizer_json))
    for module in model.modules():  # ones-initialized norms would hide a mix-up of norm weights
        if hasattr(module, "eps"):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    expected = write_gguf(path, model, tokenizer_json)
    return path, expected


@pytest.fixture(scope="module")
def imported(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "tiny-llama"
    result = run_speed("import", "gguf", str(source[0]), str(out), "--stages", "3")
    assert result.returncode == 0, result.stderr
    assert "5 layers as 3 stage(s) of 2 + 2 + 1 layers" in result.stderr
    # by default a file whose layers are not all in blocks the fast kind keeps becomes float32, and the import
    # chooses the gate of its guesses
    assert "layers of F16, F32, Q4_1, Q8_0: dequantized to float32" in result.stderr
    assert "guess thresholds per early stage" in result.stdout
    return out


def test_the_import_recovers_every_weight_and_undoes_the_rotary_permutation(source, imported):
    _, expected = source
    state = model_from_bundle(load_bundle(imported)).state_dict()
    assert set(state) == set(expected)
    for name, weight in expected.items():
        np.testing.assert_array_equal(state[name].numpy(), weight, err_msg=name)


def test_the_bundle_has_one_graph_per_stage_and_the_file_s_special_tokens(imported):
    bundle = load_bundle(imported)
    assert [p.name for p in bundle.stage_graphs] == ["stage_0.onnx", "stage_1.onnx", "stage_2.onnx"]
    assert [s["layers"] for s in bundle.manifest["stages"]] == [[0, 1], [2, 3], [4]]
    assert bundle.eos_token_id == bundle.config.vocab_size - 1
    tokenizer = bundle.tokenizer()
    assert tokenizer.encode("<|im_end|>").ids == [bundle.eos_token_id]  # a special token is one token
    assert bundle.manifest["source"]["gguf"] == "tiny-llama.gguf"


def test_onnx_torch_speculative_and_plain_decoding_agree(imported):
    bundle = load_bundle(imported)
    tokenizer = bundle.tokenizer()
    onnx_model, torch_model = open_stage_model(bundle), open_stage_model(bundle, backend="torch")
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    speculative = generate_speculative(onnx_model, prompts, max_new_tokens=24, eos_id=-1)
    for prompt, spec in zip(prompts, speculative):
        plain = generate_plain(onnx_model, prompt, max_new_tokens=24, eos_id=-1).token_ids
        assert generate_plain(torch_model, prompt, max_new_tokens=24, eos_id=-1).token_ids == plain
        assert spec.token_ids == plain


@pytest.mark.parametrize("kind", ["f32", "q4"])
@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.8, seed=5)], ids=["greedy", "sampled"])
def test_a_gpu_s_path_decodes_stages_of_their_own_graphs_speculatively_as_plainly(four_bit, kind, sampling):
    """As a GPU runs it, on the CPU provider: a decode tile per stage graph, each over the whole cache, the hidden
    states kept between them (a later stage's call reads what the one before it left in the previous tick)."""
    bundle = load_bundle(four_bit[kind])
    model = OnnxStageModel(bundle, threads=1, device_resident=True, decode_tiles=True)
    prompts = [bundle.tokenizer().encode(p).ids for p in PROMPTS]
    kwargs = {"max_new_tokens": 24, "eos_id": -1, "sampling": sampling}
    plain = [generate_plain(model, prompt, **kwargs).token_ids for prompt in prompts]
    assert [generation.token_ids for generation in generate_speculative(model, prompts, **kwargs)] == plain


def test_chat_prompts_are_rendered_with_the_model_s_template(imported):
    result = run_speed("reference", "--bundle", str(imported), "--chat", "--json", "--max-new-tokens", "4", "Hello")
    assert result.returncode == 0, result.stderr
    tokenizer = load_bundle(imported).tokenizer()
    rendered = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads(result.stdout)["prompt_tokens"] == len(tokenizer.encode(rendered).ids)


def test_stages_of_the_sizes_asked_for_decode_like_the_even_split(source, imported, tmp_path):
    out = tmp_path / "uneven"
    result = run_speed("import", "gguf", str(source[0]), str(out), "--stage-layers", "1,3,1", "--no-calibrate")
    assert result.returncode == 0, result.stderr
    assert "5 layers as 3 stage(s) of 1 + 3 + 1 layers" in result.stderr
    uneven, even = load_bundle(out), load_bundle(imported)
    assert [s["layers"] for s in uneven.manifest["stages"]] == [[0], [1, 2, 3], [4]]
    assert len(even.manifest["guess_gate"]["thresholds"]) == 2 and "guess_gate" not in uneven.manifest
    prompt = uneven.tokenizer().encode(PROMPTS[0]).ids
    expected = generate_plain(open_stage_model(even), prompt, max_new_tokens=16, eos_id=-1).token_ids
    (speculative,) = generate_speculative(open_stage_model(uneven), [prompt], max_new_tokens=16, eos_id=-1)
    assert speculative.token_ids == expected
    assert_one_line_error(run_speed("import", "gguf", str(source[0]), str(tmp_path / "bad"), "--stage-layers", "2,2"),
                          "--stage-layers 2,2", "add up to 4 layers", "has 5")
    assert not (tmp_path / "bad").exists()


def test_a_cluster_serves_the_imported_model_like_the_reference(imported, tmp_path, state_dir):
    bundle = load_bundle(imported)
    model = open_stage_model(bundle)
    tokenizer = bundle.tokenizer()
    with LocalCluster(write_cluster(tmp_path, bundle=imported, stages=[[0], [1, 2]])) as cluster:
        with Client(cluster.endpoint) as client:
            for prompt in PROMPTS[:2]:
                expected = generate_plain(model, tokenizer.encode(prompt).ids, max_new_tokens=16, eos_id=-1).token_ids
                for speculative in (False, True):
                    result = client.generate(prompt, max_new_tokens=16, ignore_eos=True, speculative=speculative)
                    assert result.result().token_ids == expected



def test_a_lost_stage_moves_only_to_a_node_holding_its_graph(imported, tmp_path, state_dir):
    bundle = load_bundle(imported)
    prompt_ids = bundle.tokenizer().encode(PROMPTS[0]).ids
    expected = generate_plain(open_stage_model(bundle), prompt_ids, max_new_tokens=24, eos_id=-1).token_ids
    path = write_cluster(tmp_path, bundle=imported, standby_stages={0: [1]})  # edge-1 can also run stage 1
    with LocalCluster(path) as cluster, Client(cluster.endpoint) as client:
        stream = client.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True)
        chunks = iter(stream)
        received = list(next(chunks).token_ids)
        os.kill(cluster.processes["edge-2"].pid, signal.SIGKILL)
        received += [token for chunk in chunks for token in chunk.token_ids]
        assert received == stream.result().token_ids == expected
        assert {n.name: list(n.hosting) for n in client.status().nodes}["edge-1"] == [0, 1]
        cluster.processes.pop("edge-2").wait()

        os.kill(cluster.processes["edge-3"].pid, signal.SIGKILL)  # nobody else holds stage 2's graph
        cluster.processes.pop("edge-3").wait()
        with pytest.raises(Unavailable, match="no serving node can run stage 2: node edge-3 .* no other node holds "
                                              "that stage's graph"):
            deadline = time.monotonic() + 10  # an idle cluster notices the loss by missed heartbeats
            while time.monotonic() < deadline:
                client.generate(PROMPTS[1], max_new_tokens=4).result()
                time.sleep(0.2)


def test_bad_files_and_stage_counts_are_refused_and_nothing_is_written(source, tiny_bundle, tmp_path):
    path, _ = source
    out = tmp_path / "out"
    assert_one_line_error(run_speed("import", "gguf", str(path), str(out), "--stages", "6"),
                          "the model has 5 layers; choose 1 to 5")
    assert_one_line_error(run_speed("import", "gguf", str(tmp_path / "missing.gguf"), str(out), "--stages", "2"),
                          "does not exist")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(run_speed("import", "gguf", str(truncated), str(out), "--stages", "2"),
                          "not a readable GGUF file")
    other = tmp_path / "gpt2.gguf"
    tokenizer_json = json.loads((tiny_bundle / "tokenizer.json").read_text())
    write_gguf(other, SpeedDecoder(ModelConfig(vocab_size=len(tokenizer_json["model"]["vocab"]) + 2, d_model=32,
                                               n_heads=2, n_kv_heads=2, ffn_hidden=64, n_distinct_layers=2, n_stages=2,
                                               context_length=64, shared_layers=False)),
               tokenizer_json, architecture="gpt2")
    assert_one_line_error(run_speed("import", "gguf", str(other), str(out), "--stages", "2"),
                          "architecture 'gpt2' is not supported")
    odd = tmp_path / "q8_1.gguf"
    write_gguf(odd, SpeedDecoder(source_config(tokenizer_json)), tokenizer_json,
               types={**TYPES, "attn_v": GGMLQuantizationType.Q8_1})
    assert_one_line_error(run_speed("import", "gguf", str(odd), str(out), "--stages", "2"),
                          "tensor blk.0.attn_v.weight is of type Q8_1")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # no half-written bundle


def test_an_existing_bundle_directory_is_kept_unless_forced(source, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    assert_one_line_error(run_speed("import", "gguf", str(source[0]), str(out), "--stages", "1"), "already exists")


@pytest.fixture(scope="module")
def four_bit(tiny_bundle, tmp_path_factory) -> dict[str, Path | str]:
    """A file of 4-bit layers and a Q8_0 embedding imported three times: float32, the default (the file's kind:
    keeping its blocks, with int8 activations), and keeping its 4-bit blocks with float32 arithmetic; and what
    the second printed."""
    tokenizer_json = json.loads((tiny_bundle / "tokenizer.json").read_text())
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("gguf") / "four-bit.gguf"
    write_gguf(path, SpeedDecoder(source_config(tokenizer_json)), tokenizer_json, types=FOUR_BIT)
    out = tmp_path_factory.mktemp("imported")
    imports = {"f32": ["--weights", "f32"], "q4": [], "q4-level1": ["--weights", "q4", "--accuracy-level", "1"]}
    printed = {}
    for kind, flags in imports.items():
        result = run_speed("import", "gguf", str(path), str(out / kind), "--stages", "3", "--no-calibrate", *flags)
        assert result.returncode == 0, result.stderr
        printed[kind] = result.stderr
    return {**{kind: out / kind for kind in imports}, "printed": printed["q4"]}


def _stage_files_bytes(bundle) -> int:
    return sum(meta["bytes"] for name, meta in bundle.manifest["files"].items() if name.startswith("stage_"))


def test_a_4_bit_import_keeps_the_file_s_blocks_and_computes_what_the_file_says(four_bit):
    floats, kept = load_bundle(four_bit["f32"]), load_bundle(four_bit["q4-level1"])
    made = kept.manifest["quantization"]
    assert len(made["kept_from_gguf"]) == 5 * 7 and made["quantized_from_values"] == []
    assert made["float32"] == ["token_embd.weight"]  # no fast 8-bit kernel with float32 arithmetic
    assert kept.quantized and made["accuracy_level"] == 1
    # the same numbers as the float32 import of the file, only stored in its 4 bits
    hidden = np.random.default_rng(0).standard_normal((2, 5, kept.config.d_model)).astype(np.float32)
    for graph_float, graph_kept in zip(floats.stage_graphs, kept.stage_graphs):
        expected, got = (_run_stage(path, hidden) for path in (graph_float, graph_kept))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert _stage_files_bytes(kept) < _stage_files_bytes(floats) / 3


def test_with_int8_activations_the_q8_0_embedding_is_kept_as_the_head_s_weights_and_the_table(four_bit):
    floats, kept = load_bundle(four_bit["f32"]), load_bundle(four_bit["q4"])
    made = kept.manifest["quantization"]
    assert made["accuracy_level"] == 4
    assert "token_embd.weight" in made["kept_from_gguf"] and made["float32"] == []
    assert "layers of Q4_0, Q4_1: kept in their blocks for serving (--weights f32 for float32)" in four_bit["printed"]
    assert ("kept the file's own blocks of 35 of 35 layer matrices (Q4_0, Q4_1) and of the embedding and tied head "
            "(Q8_0)") in four_bit["printed"]
    assert kept.manifest["embedding"]["dtype"] == "q8_0" and "embedding.bin" not in kept.manifest["files"]
    ids = np.arange(kept.config.vocab_size).reshape(2, -1)
    assert np.array_equal(kept.embedding()[ids], floats.embedding()[ids])  # llama.cpp's numbers, bit for bit
    # one file is both the table and the head's weights: the head graph holds none of its own
    assert kept.manifest["files"]["head.onnx"]["bytes"] < 64 * 1024
    total = sum(meta["bytes"] for meta in kept.manifest["files"].values())
    assert total < 0.35 * sum(meta["bytes"] for meta in floats.manifest["files"].values())
    # int8 activations round the inputs of every product: close to the float32 import, not equal
    model, float_model = open_stage_model(kept), open_stage_model(floats)
    hidden = float_model.embed(np.asarray([ids[0, :8]]))
    logits, float_logits = (m.classify(hidden[0])[0] for m in (model, float_model))
    assert np.abs(logits - float_logits).max() < 0.05 * np.abs(float_logits).max()


@pytest.mark.parametrize("kind", ["q4", "q4-level1"])
@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.8, top_p=0.95, seed=5)],
                         ids=["greedy", "sampled"])
def test_speculative_decoding_of_a_4_bit_import_equals_its_sequential_decoding(four_bit, kind, sampling):
    bundle = load_bundle(four_bit[kind])
    model = open_stage_model(bundle)
    prompts = [bundle.tokenizer().encode(p).ids for p in PROMPTS]
    sequential = [generate_plain(model, p, max_new_tokens=24, eos_id=-1, sampling=sampling).token_ids for p in prompts]
    speculative = generate_speculative(model, prompts, max_new_tokens=24, eos_id=-1, sampling=sampling)
    assert [g.token_ids for g in speculative] == sequential


def test_matrices_in_other_types_are_quantized_from_their_values(source, tmp_path):
    out = tmp_path / "q4"
    result = run_speed("import", "gguf", str(source[0]), str(out), "--stages", "3", "--weights", "q4",
                       "--no-calibrate")
    assert result.returncode == 0, result.stderr
    made = load_bundle(out).manifest["quantization"]
    assert made["kept_from_gguf"] == sorted(f"blk.{i}.{part}.weight" for i in range(5)  # the file's Q4_1 and Q8_0 ones
                                            for part in ("attn_k", "ffn_up")) + ["token_embd.weight"]
    assert "blk.0.ffn_down.weight" in made["quantized_from_values"]  # F16
    assert "blk.0.attn_q.weight" in made["quantized_from_values"]  # F32


def _run_stage(graph: Path, hidden: np.ndarray) -> np.ndarray:
    """One stage over new tokens with empty caches."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feeds = {"hidden": hidden, "cache_length": np.zeros(len(hidden), np.int64)}
    for spec in session.get_inputs()[2:]:
        shape = [len(hidden), *[0 if dim == "capacity" else dim for dim in spec.shape[1:]]]
        feeds[spec.name] = np.zeros(shape, np.float32)
    return session.run(["hidden_out"], feeds)[0]
