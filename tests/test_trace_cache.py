"""Traces kept between exports: an export binding its weights into a kept trace writes, byte for byte, what
tracing would have written; a kept trace that is damaged or made for another model is traced again; the cache
keeps its newest entries only, and `speed cache` lists and clears them; and an export where none can be kept
writes the same graphs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.training  # traces torch models to ONNX

torch = pytest.importorskip("torch")

from runtime.core.config import ModelConfig  # noqa: E402
from runtime.core.progress import NO_PROGRESS, Progress  # noqa: E402
from runtime.models.decoder import SpeedDecoder  # noqa: E402
from runtime.models.export import write_model  # noqa: E402
from runtime.models.trace_binding import keep_trace  # noqa: E402
from runtime.models.trace_cache import ENTRIES, trace_cache_root  # noqa: E402

# distinct layers in stages of 2 and 1: two stage traces and the head's
ARCHITECTURE = dict(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=64, n_distinct_layers=3,
                    n_stages=2, context_length=32, shared_layers=False)


def model(seed: int, **changes) -> SpeedDecoder:
    torch.manual_seed(seed)
    return SpeedDecoder(ModelConfig(**{**ARCHITECTURE, **changes})).eval()


class Notes(Progress):
    def __init__(self):
        self.lines: list[str] = []

    def note(self, line: str) -> None:
        self.lines.append(line)


def exported(decoder: SpeedDecoder, out_dir: Path, notes: Progress = NO_PROGRESS) -> dict[str, bytes]:
    out_dir.mkdir(parents=True)
    write_model(decoder, out_dir, notes)
    return {path.name: path.read_bytes() for path in sorted(out_dir.iterdir())}


def test_another_model_of_the_architecture_binds_the_kept_traces_and_writes_what_tracing_writes(tmp_path,
                                                                                                monkeypatch):
    monkeypatch.setenv("SPEED_TRACE_CACHE", str(tmp_path / "kept"))
    first, second = Notes(), Notes()
    exported(model(0), tmp_path / "first", first)
    assert len(list((tmp_path / "kept").glob("*.onnx"))) == 3  # a stage of 2 layers, one of 1, the head
    assert [line.split(":")[0] for line in first.lines if "traced in" in line] == [
        "the stage of 2 layers", "the stage of 1 layer", "the head"]
    # other weights, and the stages split the other way: each trace bound where its layers are not the first
    other = model(1, stage_sizes=(1, 2))
    from_kept = exported(other, tmp_path / "from-kept", second)
    assert sorted(second.lines) == sorted(f"the {graph}: bound to the trace kept in {tmp_path / 'kept'}"
                                          for graph in ("stage of 1 layer", "stage of 2 layers", "head"))
    monkeypatch.setenv("SPEED_TRACE_CACHE", str(tmp_path / "empty"))
    traced = exported(other, tmp_path / "traced")
    assert from_kept.keys() == traced.keys() and "stage_1.onnx" in traced
    for name in traced:
        assert from_kept[name] == traced[name], name


def test_a_damaged_trace_or_one_of_another_model_is_traced_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPEED_TRACE_CACHE", str(tmp_path / "kept"))
    decoder = model(0)
    expected = exported(decoder, tmp_path / "first")
    kept = sorted(trace_cache_root().glob("*.onnx"), key=lambda path: path.stat().st_size)
    kept[0].write_bytes(b"not a graph")  # the head's, the smallest
    kept[1].write_bytes(kept[2].read_bytes())  # a stage of 1 layer named as a stage of 2, or the other way
    with caplog.at_level(logging.WARNING, logger="speed.export"):
        again = exported(decoder, tmp_path / "again")
    assert again == expected
    assert "the kept trace" in caplog.text and "cannot be read" in caplog.text and "does not fit" in caplog.text
    # traced again, they are kept again
    with caplog.at_level(logging.WARNING, logger="speed.export"):
        caplog.clear()
        assert exported(decoder, tmp_path / "third") == expected
    assert not caplog.text


def test_the_cache_keeps_its_newest_traces(tmp_path, monkeypatch):
    import onnx

    monkeypatch.setenv("SPEED_TRACE_CACHE", str(tmp_path / "kept"))
    graph = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    for index in range(ENTRIES + 3):
        keep_trace(f"trace-{index:02}", graph, {})
        time.sleep(0.02)  # beyond the file system's clock tick, so each is newer than the one before
    assert sorted(path.stem for path in trace_cache_root().glob("*")) == [f"trace-{i:02}" for i in range(3, ENTRIES + 3)]


def test_an_export_where_no_trace_can_be_kept_still_writes_its_graphs(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SPEED_TRACE_CACHE", str(tmp_path / "kept"))
    expected = exported(model(0), tmp_path / "kept-export")
    monkeypatch.setenv("SPEED_TRACE_CACHE", str(blocker / "traces"))  # cannot be made
    with caplog.at_level(logging.WARNING, logger="speed.export"):
        assert exported(model(0), tmp_path / "unkept-export") == expected
    assert "could not keep the trace" in caplog.text and not list(tmp_path.glob("**/*.partial"))


def test_speed_cache_lists_and_clears_the_kept_traces(tmp_path, monkeypatch):
    import onnx

    monkeypatch.setenv("SPEED_GRAPH_CACHE", str(tmp_path / "graphs"))
    monkeypatch.setenv("SPEED_TRACE_CACHE", str(tmp_path / "kept"))
    graph = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    for key in ("older", "newer"):
        keep_trace(key, graph, {})
        time.sleep(0.02)
    speed = [sys.executable, "-m", "runtime.cli", "cache"]
    listed = subprocess.run(speed, capture_output=True, text=True, env=os.environ)
    assert listed.returncode == 0, listed.stderr
    assert f"{tmp_path / 'kept'}: 2 traces" in listed.stdout and f"the {ENTRIES} used last are kept" in listed.stdout
    assert listed.stdout.index("newer.onnx") < listed.stdout.index("older.onnx")  # the one used last first
    cleared = subprocess.run([*speed, "--clear"], capture_output=True, text=True, env=os.environ)
    assert cleared.returncode == 0 and f"removed 2 traces (0.0 MB) from {tmp_path / 'kept'}" in cleared.stdout
    assert not list((tmp_path / "kept").iterdir())
