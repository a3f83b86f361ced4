"""Machine-local pre-packed copies of a bundle's graphs: made once, shared, and computing what the
original graph computes."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.core.bundle import load_bundle
from runtime.executor import prepacked_graphs
from runtime.executor.kv_cache import KVCache
from runtime.executor.onnx_session import create_session
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.executor.prepacked_graphs import DATA_FILE, cached_graphs, prepacked_graph, probe_feeds


def stage_outputs(session, cfg, rows=2, length=5, capacity=12):
    rng = np.random.default_rng(0)
    cache = KVCache(cfg, rows=rows, capacity=capacity)
    cache.keys[...] = rng.normal(size=cache.keys.shape)
    cache.values[...] = rng.normal(size=cache.values.shape)
    cache.lengths[:] = [3, 7]
    hidden = rng.normal(size=(rows, length, cfg.d_model)).astype(np.float32)
    return session.run(None, {"hidden": hidden, **cache.feeds(slice(0, rows), cfg.max_stage_layers)})


def test_the_copy_is_made_once_and_computes_what_the_original_computes(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEED_GRAPH_CACHE", str(tmp_path / "graphs"))
    bundle = load_bundle(tiny_bundle)
    (path,) = set(bundle.stage_graphs)
    copy = prepacked_graph(path, bundle.file_sha256(path))
    made = copy.stat().st_mtime_ns
    assert prepacked_graph(path, bundle.file_sha256(path)) == copy and copy.stat().st_mtime_ns == made
    assert (copy.parent / "graph.data").stat().st_size > 0  # the weights, pre-packed, in a mapped file
    original = stage_outputs(create_session(path, threads=1), bundle.config)
    prepacked = stage_outputs(create_session(path, threads=1, sha256=bundle.file_sha256(path)), bundle.config)
    for a, b in zip(original, prepacked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_without_a_writable_cache_the_original_graph_is_loaded(tiny_bundle, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("SPEED_GRAPH_CACHE", str(blocker / "graphs"))
    with caplog.at_level(logging.WARNING, logger="speed.node"):
        model = OnnxStageModel(load_bundle(tiny_bundle), threads=1)
    assert "loading the graph itself" in caplog.text
    assert model.classify(np.zeros((1, model.config.d_model), np.float32))[1].shape == (1,)


def saving_wrong_weights(monkeypatch, *, prepacked_only: bool) -> None:
    """ONNX Runtime as it was for one int4 graph of SmolLM2 (MatMulNBits at accuracy level 4): the copy it saves
    reads back wrong. Here its weights read back as zeros, in copies with pre-packed weights or in all."""
    real = prepacked_graphs.ort.InferenceSession

    def session(path, sess_options=None, **kwargs):
        made = real(path, sess_options=sess_options, **kwargs)
        saved = sess_options is not None and sess_options.optimized_model_filepath
        if saved and (not prepacked_only or sess_options.get_session_config_entry(
                "session.save_external_prepacked_constant_initializers") == "1"):
            data = Path(sess_options.optimized_model_filepath).parent / DATA_FILE
            data.write_bytes(bytes(data.stat().st_size))
        return made

    monkeypatch.setattr(prepacked_graphs.ort, "InferenceSession", session)


def test_a_copy_whose_pre_packed_weights_read_back_wrong_is_saved_without_them(tiny_bundle, tmp_path, monkeypatch,
                                                                               caplog):
    monkeypatch.setenv("SPEED_GRAPH_CACHE", str(tmp_path / "graphs"))
    bundle = load_bundle(tiny_bundle)
    (path,) = set(bundle.stage_graphs)
    saving_wrong_weights(monkeypatch, prepacked_only=True)
    with caplog.at_level(logging.INFO, logger="speed.node"):
        copy = prepacked_graph(path, bundle.file_sha256(path))
    assert "saving it without pre-packed weights" in caplog.text
    original = create_session(path, threads=1)
    feeds = probe_feeds(original)
    for a, b in zip(original.run(None, feeds), create_session(copy, threads=1).run(None, feeds)):
        assert np.array_equal(a, b)


def test_a_graph_no_copy_of_which_computes_the_same_bits_is_loaded_itself(tiny_bundle, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPEED_GRAPH_CACHE", str(tmp_path / "graphs"))
    saving_wrong_weights(monkeypatch, prepacked_only=False)
    with caplog.at_level(logging.WARNING, logger="speed.node"):
        model = OnnxStageModel(load_bundle(tiny_bundle), threads=1)
    assert "copy of stage.onnx does not compute what the graph computes); loading the graph itself" in caplog.text
    assert cached_graphs() == []
    assert model.classify(np.zeros((1, model.config.d_model), np.float32))[1].shape == (1,)


def test_the_cache_keeps_to_its_limit_dropping_the_least_recently_used(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEED_GRAPH_CACHE", str(tmp_path / "graphs"))
    bundle = load_bundle(tiny_bundle)
    (path,) = set(bundle.stage_graphs)
    first = prepacked_graph(path, "a" * 64)  # the same graph under three keys: three copies of one size
    size = sum(f.stat().st_size for f in first.parent.iterdir())
    monkeypatch.setattr(prepacked_graphs, "cache_limit_bytes", lambda: 2 * size + size // 2)  # room for two
    second = prepacked_graph(path, "b" * 64)
    os.utime(first.parent, (1, 1))  # the first was used long ago ...
    prepacked_graph(path, "b" * 64)  # ... and the second just now
    third = prepacked_graph(path, "c" * 64)
    assert {entry.path for entry in cached_graphs()} == {second.parent, third.parent}


def test_speed_cache_lists_and_clears_the_copies(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEED_GRAPH_CACHE", str(tmp_path / "graphs"))
    monkeypatch.setenv("SPEED_TRACE_CACHE", str(tmp_path / "traces"))  # --clear clears them too
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bundle = load_bundle(tiny_bundle)
    (path,) = set(bundle.stage_graphs)
    copy = prepacked_graph(path, bundle.file_sha256(path))
    speed = [sys.executable, "-m", "runtime.cli", "cache"]
    listed = subprocess.run(speed, capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and "1 copy" in listed.stdout and copy.parent.name in listed.stdout
    cleared = subprocess.run([*speed, "--clear"], capture_output=True, text=True, env=env)
    assert cleared.returncode == 0 and "removed 1 copy" in cleared.stdout and not copy.parent.exists()
    bad = subprocess.run(speed, capture_output=True, text=True, env={**env, "SPEED_GRAPH_CACHE_MB": "lots"})
    assert bad.returncode == 1 and bad.stderr.strip().endswith("got 'lots'") and "Traceback" not in bad.stderr


def test_a_derived_graph_for_a_gpu_is_derived_once_and_saved(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEED_GRAPH_CACHE", str(tmp_path / "graphs"))
    bundle = load_bundle(tiny_bundle)
    (path,) = set(bundle.stage_graphs)
    derive, calls = prepacked_graphs.DERIVED["writes"], []
    monkeypatch.setitem(prepacked_graphs.DERIVED, "writes", lambda graph: calls.append(graph) or derive(graph))
    copy = prepacked_graphs.derived_copy(path, bundle.file_sha256(path), "writes")
    assert prepacked_graphs.derived_copy(path, bundle.file_sha256(path), "writes") == copy and calls == [path]
    assert copy.parent in [entry.path for entry in cached_graphs()]  # listed and trimmed like every copy
    saved, fresh = (ort.InferenceSession(source, providers=["CPUExecutionProvider"])
                    for source in (str(copy), derive(path)))
    feeds = probe_feeds(fresh)
    for a, b in zip(saved.run(None, feeds), fresh.run(None, feeds)):
        np.testing.assert_array_equal(a, b)
