"""Fused attention on the CPU: a graph exported with the fused rotary embedding runs each layer's attention
as ONNX Runtime's GroupQueryAttention, which writes the cache in place. It computes what the bundle's graph
computes, writes each row's new entries at its length and nothing else (a full row riding along:
tests/test_riding_rows.py), and speculation over it gives the text of plain decoding; an older export runs
its own graph."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.core.bundle import load_bundle
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.executor.kv_cache import KVCache
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.executor.prepacked_graphs import NOT_DERIVED, cached_graphs
from runtime.local.plain import generate_plain
from runtime.local.speculative import generate_speculative

CAPACITY = 32


@pytest.fixture(scope="module")
def models(tiny_bundle) -> tuple[OnnxStageModel, OnnxStageModel]:
    """The tiny bundle run by its own graphs (the host writes the caches), and with fused attention."""
    bundle = load_bundle(tiny_bundle)
    return OnnxStageModel(bundle, threads=1, fused_attention=False), OnnxStageModel(bundle, threads=1)


def filled(cache: KVCache, lengths: list[int], keys: np.ndarray, values: np.ndarray) -> KVCache:
    """The cache holding these keys and values (L, R, Hkv, C, hd) at its first C positions."""
    cache.position_keys()[..., :CAPACITY, :] = keys
    cache.values[..., :CAPACITY, :] = values
    cache.lengths[:] = lengths
    return cache


calls = st.fixed_dictionaries({
    "stage": st.integers(0, 2),
    "tokens": st.integers(1, 5),
    "lengths": st.lists(st.integers(0, CAPACITY), min_size=1, max_size=5),  # CAPACITY: a full row
    "first": st.integers(0, 2),  # rows before the call's span
    "seed": st.integers(0, 2**32 - 1),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=calls)
def test_fused_attention_computes_and_writes_what_the_bundles_graph_does(models, call):
    """Rows with room get the same hidden states and entries; every row keeps the entries it holds."""
    own, fused = models
    cfg = own.config
    lengths = [0] * call["first"] + call["lengths"]
    rows, T = slice(call["first"], len(lengths)), call["tokens"]
    rng = np.random.default_rng(call["seed"])
    hidden = rng.standard_normal((len(call["lengths"]), T, cfg.d_model)).astype(np.float32)
    shape = (cfg.max_stage_layers, len(lengths), cfg.n_kv_heads, CAPACITY, cfg.head_dim)
    keys, values = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    host = filled(own.new_cache(rows=len(lengths), capacity=CAPACITY), lengths, keys, values)
    bound = filled(fused.new_cache(rows=len(lengths), capacity=CAPACITY), lengths, keys, values)
    assert bound.keys_by_position and not host.keys_by_position
    expected = own.run_stage(call["stage"], hidden, host, rows)
    got = fused.run_stage(call["stage"], hidden, bound, rows)
    for row, length in enumerate(lengths):
        assert np.array_equal(bound.position_keys()[:, row, :, :length], keys[:, row, :, :length])
        assert np.array_equal(bound.values[:, row, :, :length], values[:, row, :, :length])
        if length + T <= CAPACITY and row >= rows.start:
            np.testing.assert_allclose(got[row - rows.start], expected[row - rows.start], atol=1e-5)
            written = slice(length, length + T)
            np.testing.assert_allclose(bound.position_keys()[:, row, :, written],
                                       host.position_keys()[:, row, :, written], atol=1e-5)
            np.testing.assert_allclose(bound.values[:, row, :, written], host.values[:, row, :, written], atol=1e-5)


def test_a_cache_with_keys_by_position_keeps_its_entries_when_it_grows_and_is_not_written_by_the_host(models):
    cache = models[1].new_cache(rows=2, capacity=16)
    cache.keys[...] = np.random.default_rng(0).standard_normal(cache.keys.shape)
    before = cache.keys.copy()
    cache.resize(40)
    assert cache.capacity == 48 and cache.keys.shape[-2] == 49  # a spare position a row
    assert np.array_equal(cache.keys[..., :16, :], before[..., :16, :]) and not cache.keys[..., 16:, :].any()
    with pytest.raises(TypeError, match="written by the stage graphs"):
        cache.write(slice(0, 1), [], [])


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.9, top_p=0.95, seed=7)])
def test_speculation_over_fused_attention_gives_the_text_of_plain_decoding(models, sampling):
    fused = models[1]
    assert fused.fused_attention
    prompts = [[5, 17, 99, 3], list(range(40, 71)), [250] * 9]
    plain = [generate_plain(fused, prompt, max_new_tokens=40, eos_id=-1, sampling=sampling).token_ids
             for prompt in prompts]
    together = generate_speculative(fused, prompts, max_new_tokens=40, eos_id=-1, sampling=sampling, prefill_chunk=8)
    assert [generation.token_ids for generation in together] == plain


def test_an_older_export_runs_its_own_graph_and_is_not_read_again_to_find_out(older_tiny_bundle, tmp_path, monkeypatch,
                                                                              caplog):
    monkeypatch.setenv("SPEED_GRAPH_CACHE", str(tmp_path / "graphs"))
    bundle = load_bundle(older_tiny_bundle)  # its rotary embedding is not the fused operator
    with caplog.at_level(logging.INFO, logger="speed.node"):
        model = OnnxStageModel(bundle, threads=1)
    assert not model.fused_attention and not model.new_cache(rows=1, capacity=16).keys_by_position
    assert f"`speed export {older_tiny_bundle} OUT_DIR` exports its graphs again" in caplog.text
    remembered = [entry.path for entry in cached_graphs() if (entry.path / NOT_DERIVED).is_file()]
    assert len(remembered) == 1 and "stage.onnx" in (remembered[0] / NOT_DERIVED).read_text()
    reads = []
    monkeypatch.setattr("runtime.executor.fused_attention.fused_attention_model", lambda path: reads.append(path))
    assert not OnnxStageModel(bundle, threads=1).fused_attention and not reads
