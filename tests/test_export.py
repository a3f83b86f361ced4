"""Export parity: ONNX Runtime against torch on the same bundle, logits and greedy tokens."""

import json
import shutil

import numpy as np
import onnx
import pytest

from runtime.core.bundle import load_bundle
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.local.plain import generate_plain
from runtime.models.torch_backend import TorchStageModel
from tests.conftest import assert_one_line_error, run_speed
from tests.support import assert_backends_agree

pytestmark = pytest.mark.training  # its tests train, export, quantize or calibrate a model


@pytest.fixture(scope="module")
def models(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return bundle, OnnxStageModel(bundle, threads=1), TorchStageModel(bundle)


def test_manifest_describes_the_bundle(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["model_config"]["n_stages"] == 3
    assert [s["graph"] for s in manifest["stages"]] == ["stage.onnx"] * 3
    assert manifest["dtype"] == "float32"
    assert set(manifest["files"]) == {"stage.onnx", "head.onnx", "embedding.bin", "tokenizer.json", "training_report.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())


def test_the_embedding_is_stored_once(tiny_bundle):
    head = onnx.load(str(tiny_bundle / "head.onnx"), load_external_data=False)
    (table,) = [t for t in head.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {e.key: e.value for e in table.external_data}["location"] == "embedding.bin"
    assert (tiny_bundle / "head.onnx").stat().st_size < 20_000


def stage_logits(model, token_ids, chunks):
    """Logits after every stage for the tokens, fed in the given (start, end) chunks."""
    cfg = model.config
    cache = model.new_cache(rows=cfg.n_stages, capacity=len(token_ids) + 4)
    per_stage = [[] for _ in range(cfg.n_stages)]
    for start, end in chunks:
        hidden = model.embed(np.asarray([token_ids[start:end]], dtype=np.int64))
        for s in range(cfg.n_stages):
            hidden = model.run_stage(s, hidden, cache, slice(s, s + 1))
            cache.advance(s, end - start)
            per_stage[s].append(model.classify(hidden[0])[0])
    return [np.concatenate(x) for x in per_stage]


def test_onnx_logits_match_torch_at_every_stage(models):
    bundle, onnx_model, torch_model = models
    token_ids = bundle.tokenizer().encode("ROMEO. But soft, what light through yonder window breaks?").ids
    chunks = [(0, 5)] + [(i, i + 1) for i in range(5, len(token_ids))]
    for got, expected in zip(stage_logits(onnx_model, token_ids, chunks), stage_logits(torch_model, token_ids, chunks)):
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-3)


def test_onnx_and_torch_give_the_same_tokens_on_many_prompts(models):
    assert_backends_agree(*models, max_new_tokens=24)


def test_stage_graphs_rotate_with_onnx_runtimes_fused_kernel(tiny_bundle):
    """One fused RotaryEmbedding for the queries and one for the keys of each layer, reading constant tables: no
    cos or sin computed per call (the tests above check that the fused graph computes what torch does)."""
    layers = len(load_bundle(tiny_bundle).config.stage_layers(0))
    graph = onnx.load(str(tiny_bundle / "stage.onnx"), load_external_data=False).graph
    fused = [n for n in graph.node if (n.domain, n.op_type) == ("com.microsoft", "RotaryEmbedding")]
    assert len(fused) == 2 * layers
    assert not [n for n in graph.node if n.op_type in ("Cos", "Sin")]


def test_a_stage_given_another_stage_s_graph_is_the_graph_its_own_trace_gives(tmp_path, monkeypatch):
    """Stages of one size share a trace: the second gets the first's graph, kept without weights, bound to its own
    weights, which must be what tracing it would have written, operation for operation and weight for weight."""
    import torch
    from onnx import numpy_helper

    from runtime.core.config import ModelConfig
    from runtime.models.decoder import SpeedDecoder
    from runtime.models.export import export_stage
    from runtime.models.trace_binding import bind, keep_trace

    monkeypatch.setenv("SPEED_TRACE_CACHE", str(tmp_path / "traces"))
    torch.manual_seed(0)
    model = SpeedDecoder(ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                                     n_distinct_layers=2, n_stages=2, context_length=32, shared_layers=False))
    export_stage(model, 0, tmp_path / "stage_0.onnx")
    export_stage(model, 1, tmp_path / "traced.onnx")
    stripped = keep_trace("stage", onnx.load(str(tmp_path / "stage_0.onnx")), model.state_dict())
    kept = [t for t in stripped.graph.initializer if t.name.removeprefix("model.") in model.state_dict()]
    assert kept and not any(t.raw_data for t in kept)  # kept without weights
    rebound = bind(stripped, model.state_dict(), first_layer=1).graph
    traced = onnx.load(str(tmp_path / "traced.onnx")).graph
    assert [(n.op_type, list(n.input)) for n in rebound.node] == [(n.op_type, list(n.input)) for n in traced.node]
    weights = {t.name: numpy_helper.to_array(t) for t in traced.initializer}
    assert {t.name for t in rebound.initializer} == set(weights) and any("layers.1." in name for name in weights)
    for tensor in rebound.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), weights[tensor.name])


def test_an_older_export_exported_again_gets_fused_attention_and_decodes_the_same_text(older_tiny_bundle, tmp_path):
    again = tmp_path / "again"
    result = run_speed("export", str(older_tiny_bundle), str(again))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote bundle {again}"
    older, newer = load_bundle(older_tiny_bundle), load_bundle(again)
    assert "RotaryEmbedding" not in {node.op_type for node in onnx.load(str(older.stage_graphs[0])).graph.node}
    old_model, new_model = OnnxStageModel(older, threads=1), OnnxStageModel(newer, threads=1)
    assert not old_model.fused_attention and new_model.fused_attention
    for prompt in ([5, 17, 99, 3], list(range(40, 71))):
        assert (generate_plain(new_model, prompt, max_new_tokens=40, eos_id=-1).token_ids
                == generate_plain(old_model, prompt, max_new_tokens=40, eos_id=-1).token_ids)
    # the weights, the tokenizer and every other entry are the bundle's own
    assert newer.manifest["files"]["embedding.bin"] == older.manifest["files"]["embedding.bin"]
    assert newer.manifest["files"]["tokenizer.json"] == older.manifest["files"]["tokenizer.json"]
    assert newer.manifest["files"]["training_report.json"] == older.manifest["files"]["training_report.json"]
    kept = ("name", "model_config", "eos_token_id", "trained_steps", "chat_template")
    assert {key: newer.manifest[key] for key in kept} == {key: older.manifest[key] for key in kept}


def test_a_bundle_is_exported_again_in_place_with_force(older_tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(older_tiny_bundle, copy)
    assert_one_line_error(run_speed("export", str(copy), str(copy)), "already exists", "--force")
    result = run_speed("export", str(copy), str(copy), "--force", "--name", "renamed")
    assert result.returncode == 0, result.stderr
    bundle = load_bundle(copy)
    assert bundle.manifest["name"] == "renamed" and OnnxStageModel(bundle, threads=1).fused_attention
