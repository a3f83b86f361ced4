"""`speed export`: turn a training checkpoint into a bundle that nodes serve with ONNX Runtime.

Graphs (B rows, T new tokens, C cache capacity, L layers per stage; all float32):
  stage.onnx  (stage_<s>.onnx per stage when stages do not share weights)
              hidden (B, T, d), cache_length (B,) int64,
              cache_key_{l} (B, Hkv, hd, C), cache_value_{l} (B, Hkv, C, hd)
           -> hidden_out (B, T, d), new_key_{l} (B, Hkv, hd, T), new_value_{l} (B, Hkv, T, hd)
  head.onnx   hidden (N, d) -> logits (N, V), token (N,) int64 (greedy argmax)
  guess head  hidden (N, d) -> logits (N, K), index (N,) int64: the head over K of the V tokens (`speed calibrate`)
The caller owns the caches: it passes them whole (no copy) and writes the new entries at
cache_length itself. The rotary embedding of the queries and keys is ONNX Runtime's fused
com.microsoft RotaryEmbedding (one operator instead of eight); its cos and sin tables cover the
model's context, so a position beyond it is an error. Graphs are exported unoptimized so
initializers keep their torch parameter names (ONNX Runtime folds the weight transposes when it
loads them). The embedding table is stored once, as raw little-endian float32 in embedding.bin,
and head.onnx reads its tied LM-head weight from that same file.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnx.external_data_helper import set_external_data
from torch import nn

from runtime.core.bundle import (
    EMBEDDING_FILE,
    HEAD_FILE,
    STAGE_FILE,
    TOKENIZER_FILE,
    TRAINING_REPORT_FILE,
    carry_other_files,
    load_bundle,
    other_manifest_entries,
    write_manifest,
)
from runtime.core.config import ModelConfig
from runtime.core.errors import SpeedError
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.core.staging import check_directory_free, staged_directory
from runtime.models.checkpoint import load_checkpoint
from runtime.models.corpus import PLAY_CHAT_TEMPLATE
from runtime.models.decoder import SpeedDecoder
from runtime.models.tokenizer import eos_id
from runtime.models.torch_backend import model_from_bundle
from runtime.models.trace_binding import bind, keep_trace, load_trace, trace_key
from runtime.models.trace_cache import trace_cache_root

OPSET = 20
log = logging.getLogger("speed.export")
EMBEDDING_WEIGHT = "model.embedding.weight"  # initializer names are the torch parameter names

# ONNX Runtime's own operator, declared here because the onnx package does not know its domain
_FUSED_ROTARY = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "RotaryEmbedding", OpSchema(
    "RotaryEmbedding", "com.microsoft", 1,
    inputs=[OpSchema.FormalParameter(name, kind) for name, kind in
            [("input", "T"), ("position_ids", "M"), ("cos_cache", "T"), ("sin_cache", "T")]],
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int64)"], "")],
    attributes=[OpSchema.Attribute("interleaved", OpSchema.AttrType.INT, "")],
))


def _fused_rotary(x, positions, cos_table, sin_table):
    """decoder.rotate_at_positions: x (B, h, T, hd), rotate-half pairs (not interleaved)."""
    return _FUSED_ROTARY(x, positions, cos_table, sin_table, interleaved=0)


class StageGraph(nn.Module):
    """One stage's layers with flat, named cache inputs and outputs. Only the layers the stage uses
    end up in the graph, under their model-wide names (model.layers.<i>...)."""

    def __init__(self, model: SpeedDecoder, stage: int):
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, hidden, cache_length, cache_keys, cache_values):
        hidden, new_keys, new_values = self.model.stage_step(hidden, cache_length, cache_keys, cache_values, self.stage)
        return hidden, *new_keys, *new_values


class HeadGraph(nn.Module):
    """The shared classifier: final norm + tied LM head, plus the greedy token."""

    def __init__(self, model: SpeedDecoder):
        super().__init__()
        self.model = model

    def forward(self, hidden):
        logits = self.model.classify(hidden)
        return logits, logits.argmax(-1)


class GuessHeadGraph(nn.Module):
    """The classifier restricted to some tokens (their rows of the tied head), for guesses: the argmax is
    an index into `token_ids`."""

    def __init__(self, model: SpeedDecoder, token_ids: np.ndarray):
        super().__init__()
        self.final_norm = model.final_norm
        self.register_buffer("rows", model.embedding.weight.detach()[torch.from_numpy(token_ids)].clone())  # (K, d)

    def forward(self, hidden):
        logits = self.final_norm(hidden) @ self.rows.T  # (N, K)
        return logits, logits.argmax(-1)


def stage_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["hidden", "cache_length"]
    inputs += [f"cache_key_{l}" for l in range(n_layers)] + [f"cache_value_{l}" for l in range(n_layers)]
    outputs = ["hidden_out"]
    outputs += [f"new_key_{l}" for l in range(n_layers)] + [f"new_value_{l}" for l in range(n_layers)]
    return inputs, outputs


def stage_graph_files(cfg: ModelConfig) -> list[str]:
    """The graph file of each stage: one for all when they share weights, else one each."""
    if cfg.shared_layers:
        return [STAGE_FILE] * cfg.n_stages
    return [f"stage_{s}.onnx" for s in range(cfg.n_stages)]


def export_stages(model: SpeedDecoder, out_dir: Path, progress: Progress = NO_PROGRESS) -> list[str]:
    """Tracing takes most of an export (12 s a stage of SmolLM2-135M's ten layers), so a stage gets the trace
    of one as deep, from this export or a kept one (runtime.models.trace_binding), with its own weights."""
    files = stage_graph_files(model.cfg)
    traces: dict[int, onnx.ModelProto] = {}
    for stage, file in enumerate(files):
        if (out_dir / file).exists():
            continue  # stages sharing their layers share one graph
        onnx.save(stage_graph(model, stage, traces, progress), str(out_dir / file))
        progress.advance()
    return files


def stage_graph(model: SpeedDecoder, stage: int, traces: dict[int, onnx.ModelProto] | None = None,
                progress: Progress = NO_PROGRESS) -> onnx.ModelProto:
    """The graph of `stage`: the trace of a stage as deep with its weights. traces (layers in a stage -> its
    trace, weights stripped): those of this export, which gain the one made or read here."""
    traces = {} if traces is None else traces
    layers = model.cfg.stage_layers(stage)
    if len(layers) in traces:
        return bind(traces[len(layers)], model.state_dict(), first_layer=layers.start)
    traces[len(layers)], graph = traced_graph(model, f"stage of {len(layers)} layer{'s' * (len(layers) != 1)}",
                                              lambda path: export_stage(model, stage, path), first_layer=layers.start,
                                              progress=progress)
    return graph


def traced_graph(model: SpeedDecoder, graph: str, trace: Callable[[Path], None], *, first_layer: int = 0,
                 progress: Progress = NO_PROGRESS) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """`graph` (trace_key's name) of `model` whose layers start at `first_layer`, as a stripped trace and bound
    to the model's weights: kept from an earlier export where it binds them, else made by `trace` (writing the
    graph to a path) and kept."""
    key = trace_key(model.cfg, graph)
    weights = model.state_dict()
    kept = load_trace(key)
    if kept is not None:
        try:
            bound = bind(kept, weights, first_layer=first_layer)
            progress.note(f"the {graph}: bound to the trace kept in {trace_cache_root()}")
            return kept, bound
        except ValueError as exc:
            log.warning("traced again: the kept trace of the %s does not fit this model (%s)", graph, exc)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "traced.onnx"
        trace(path)
        stripped = keep_trace(key, onnx.load(str(path)), weights, first_layer=first_layer)
    progress.note(f"the {graph}: traced in {time.monotonic() - started:.0f} s, kept in {trace_cache_root()} for "
                  "later exports of this architecture")
    return stripped, bind(stripped, weights, first_layer=first_layer)


def export_stage(model: SpeedDecoder, stage: int, path: Path) -> None:
    cfg = model.cfg
    L, Hkv, hd = len(cfg.stage_layers(stage)), cfg.n_kv_heads, cfg.head_dim
    B, T, C = 2, 3, 5  # example sizes; none may be 1 on a dynamic axis
    args = (
        torch.randn(B, T, cfg.d_model),
        torch.tensor([2, 4]),
        [torch.randn(B, Hkv, hd, C) for _ in range(L)],
        [torch.randn(B, Hkv, C, hd) for _ in range(L)],
    )
    rows, new, capacity = torch.export.Dim("rows"), torch.export.Dim("new_tokens"), torch.export.Dim("capacity")
    dynamic_shapes = (
        {0: rows, 1: new},
        {0: rows},
        [{0: rows, 3: capacity}] * L,
        [{0: rows, 2: capacity}] * L,
    )
    inputs, outputs = stage_io_names(L)
    _export(StageGraph(model, stage), args, path, dynamic_shapes, inputs, outputs)


def export_head(model: SpeedDecoder, path: Path, progress: Progress = NO_PROGRESS) -> None:
    _, graph = traced_graph(model, "head", lambda traced: _export(
        HeadGraph(model), (torch.randn(3, model.cfg.d_model),), traced, ({0: torch.export.Dim("rows")},), ["hidden"],
        ["logits", "token"]), progress=progress)
    onnx.save(graph, str(path))


def export_guess_head(model: SpeedDecoder, token_ids: np.ndarray, path: Path) -> None:
    _export(GuessHeadGraph(model, token_ids), (torch.randn(3, model.cfg.d_model),), path,
            ({0: torch.export.Dim("rows")},), ["hidden"], ["logits", "index"])


def _export(module, args, path, dynamic_shapes, input_names, output_names) -> None:
    # the exporter's notes (deprecations, optional torchvision ops, axis renames) are not the user's concern
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), args, str(path), dynamo=True, opset_version=OPSET, external_data=False, optimize=False,
            dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names, verbose=False,
            custom_translation_table={torch.ops.speed.rotate_at_positions.default: _fused_rotary},
        )


def share_embedding_weight(head_path: Path, embedding: np.ndarray, out_dir: Path) -> None:
    """Write the embedding once and make head.onnx read its tied LM-head weight from that file."""
    head = onnx.load(str(head_path))
    (table,) = [t for t in head.graph.initializer if t.name == EMBEDDING_WEIGHT]
    store_outside(table, embedding.astype("<f4"), out_dir / EMBEDDING_FILE)
    onnx.save(head, str(head_path))


def store_outside(tensor: onnx.TensorProto, array: np.ndarray, path: Path) -> None:
    """Write `array` to the file at `path` and make the graph's `tensor` read its values from there (a file
    beside the graph, which other readers may share)."""
    array.tofile(path)
    set_external_data(tensor, location=path.name, offset=0, length=array.nbytes)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def write_model(model: SpeedDecoder, out_dir: Path, progress: Progress = NO_PROGRESS) -> list[str]:
    """Stage graphs, head graph and embedding of a torch model; returns each stage's graph file."""
    with progress.task("graphs exported", total=len(set(stage_graph_files(model.cfg))) + 1):  # the head's too
        stage_files = export_stages(model, out_dir, progress)
        export_head(model, out_dir / HEAD_FILE, progress)
        progress.advance()
    share_embedding_weight(out_dir / HEAD_FILE, model.embedding.weight.detach().numpy(), out_dir)
    return stage_files


def export_bundle(checkpoint: Path, out_dir: Path, *, name: str | None = None, force: bool = False) -> Path:
    """Export into a temporary directory next to OUT_DIR and move it into place when complete. A bundle directory
    in place of the checkpoint is exported again (reexport_bundle)."""
    check_directory_free(out_dir, force=force)
    if checkpoint.is_dir():
        return reexport_bundle(checkpoint, out_dir, name=name, force=force)
    state = load_checkpoint(checkpoint)
    cfg: ModelConfig = state["model_config"]
    model = SpeedDecoder(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(state["tokenizer"])
    with staged_directory(out_dir, force=force) as staging:
        stage_files = write_model(model, staging)
        tokenizer.save(str(staging / TOKENIZER_FILE))
        report = checkpoint.parent / "report.json"  # written by `speed train` beside its checkpoint
        if report.is_file():
            shutil.copyfile(report, staging / TRAINING_REPORT_FILE)
        write_manifest(
            staging,
            name=name or f"speed-{cfg.name}",
            model_config=cfg,
            stage_graphs=stage_files,
            eos_token_id=eos_id(tokenizer),
            trained_steps=state["step"],
            chat_template=PLAY_CHAT_TEMPLATE,
        )
    return out_dir


def reexport_bundle(source: Path, out_dir: Path, *, name: str | None = None, force: bool = False) -> Path:
    """The float32 bundle at `source` with its stage and head graphs exported again by this exporter, from the
    bundle's own weights; every other file and manifest entry (tokenizer, exits, the guess gate, reports) is carried
    as it is. A bundle exported before the rotary embedding was one fused operator gets it, and with it fused
    attention on a CPU (runtime.executor.fused_attention) and fewer operators a layer everywhere."""
    bundle = load_bundle(source)
    if bundle.quantized:
        raise SpeedError(f"bundle {source} is quantized, and graphs are exported from float32 weights; export the "
                         "float32 bundle it was made from again, then quantize that (speed quantize)")
    model = model_from_bundle(bundle)
    remade = {path.name for path in bundle.stage_graphs} | {bundle.head_graph.name, bundle.manifest["embedding"]["file"]}
    with staged_directory(out_dir, force=force) as staging:
        stage_files = write_model(model, staging)
        carry_other_files(bundle, staging, skip=remade)
        write_manifest(staging, name=name or bundle.manifest["name"], model_config=bundle.config,
                       stage_graphs=stage_files, eos_token_id=bundle.eos_token_id, **other_manifest_entries(bundle))
    return out_dir
