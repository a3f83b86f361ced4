"""`speed import gguf`: a pretrained Llama-family model from a GGUF file, as a bundle whose stages are
contiguous ranges of its layers (distinct weights: speculation overlaps stages on different nodes).

Weights are dequantized to float32 with PyPI `gguf` (`--weights f32`), or, with `--weights q4`, the layers'
Q4_0 and Q4_1 matrices (and with int8 activations Q8_0 ones, the embedding's included) keep the file's own
blocks as MatMulNBits weights (see gguf_blocks.py) and the other layer matrices are quantized from their
values. The default (`auto`) is the file's own kind: a file whose layers are all such blocks is served from
them (measured on SmolLM2's Q4_1 file: 2.4-2.7x the float32 import's tokens/s, a quarter of its size, held-out
loss within 0.02 nats), any other file is dequantized to float32. `speed train-exit` and the torch backend read
float32 weights only. The file is read by runtime.models.gguf_file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime.core.bundle import (
    EMBEDDING_BLOCK_SCALES_FILE,
    EMBEDDING_BLOCKS_FILE,
    EMBEDDING_FILE,
    HEAD_FILE,
    TOKENIZER_FILE,
    sha256_of,
    write_manifest,
)
from runtime.core.errors import SpeedError
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.core.staging import check_directory_free, staged_directory
from runtime.models.decoder import SpeedDecoder
from runtime.models.export import store_outside, write_model
from runtime.models.gguf_blocks import BITS, BLOCK, NBitsWeight, nbits_weight
from runtime.models.gguf_file import TENSOR_NAMES, GGUFModel, Weight
from runtime.models.guess_gate import Calibration, calibrate
from runtime.models.quantize import (
    ACCURACY_LEVEL,
    INT8_ACTIVATIONS,
    Quantization,
    ort_version,
    quantize_graph,
    weight_digest,
)

IMPORT_WEIGHTS = ("auto", "f32", "q4")  # the file's kind, float32, or layers keeping the file's own blocks
DEFAULT_WEIGHTS = "auto"

def import_gguf(source: Path | GGUFModel, out_dir: Path, *, stages: int | tuple[int, ...], weights: str = DEFAULT_WEIGHTS,
                accuracy_level: int = ACCURACY_LEVEL, name: str | None = None, force: bool = False,
                gate: bool = True, progress: Progress = NO_PROGRESS) -> dict | None:
    """The GGUF file at `source` (a path, or the file opened: reading SmolLM2's metadata takes 2 s) as a bundle:
    float32, or layers keeping the file's own blocks, computed with MatMulNBits at `accuracy_level`. stages: their
    count, or each one's layer count. gate: also choose the confidence gate of its guesses (`speed calibrate`), so
    the bundle serves at its best as written; returns that calibration's report (None without one, or with one
    stage: nothing to gate)."""
    if weights not in IMPORT_WEIGHTS:
        raise SpeedError(f"--weights must be one of {', '.join(IMPORT_WEIGHTS)}, got {weights!r}")
    Quantization(accuracy_level=accuracy_level)  # checked before anything is read
    check_directory_free(out_dir, force=force)
    model_file = source if isinstance(source, GGUFModel) else GGUFModel(Path(source))
    path = model_file.path
    cfg = model_file.config(stages)
    count = sum(cfg.n_distinct_layers if "{i}" in pattern else 1 for pattern in TENSOR_NAMES)
    tensors = []  # every tensor read first: a bad one fails before any output
    with progress.task("tensors read", total=count):
        for weight in model_file.weights(cfg):
            tensors.append(weight)
            progress.advance()
    model = SpeedDecoder(cfg)
    model.load_state_dict({w.parameter: torch.from_numpy(np.array(w.values)) for w in tensors})  # writable copies
    model.eval()
    split = " + ".join(str(len(cfg.stage_layers(s))) for s in range(cfg.n_stages))
    progress.note(f"{model_file.value('general.name', path.stem)}: {cfg.n_distinct_layers} layers as {cfg.n_stages} "
                  f"stage(s) of {split} layers, d={cfg.d_model}, vocabulary {cfg.vocab_size}")
    if weights == "auto":
        kinds = sorted({w.kind for w in _layer_matrices(tensors)})
        weights = "q4" if all(_keeps(kind, accuracy_level) for kind in kinds) else "f32"
        progress.note(f"layers of {', '.join(kinds)}: " + ("kept in their blocks for serving (--weights f32 for "
                                                           "float32)" if weights == "q4" else "dequantized to float32"))
    with staged_directory(out_dir, force=force) as staging:
        progress.note("exporting the stage graphs to ONNX ...")
        stage_files = write_model(model, staging, progress)
        kept = {} if weights == "f32" else _keep_file_blocks(tensors, staging, sorted(set(stage_files)),
                                                              accuracy_level, progress)
        model_file.tokenizer().save(str(staging / TOKENIZER_FILE))
        write_manifest(
            staging, name=name or path.stem, model_config=cfg, stage_graphs=stage_files,
            eos_token_id=int(model_file.value("tokenizer.ggml.eos_token_id")),
            bos_token_id=int(model_file.value("tokenizer.ggml.bos_token_id", -1)),
            chat_template=model_file.value("tokenizer.chat_template", ""),
            source={"gguf": path.name, "sha256": sha256_of(path), "architecture": model_file.architecture},
            **kept,
        )
        if not gate or cfg.n_stages < 2:
            return None
        # every early guess is sent until a gate is chosen, and most of a pretrained model's are wrong (SmolLM2's
        # fast kind on three nodes: 37-41 tokens/s against 67 behind its gate)
        progress.note("choosing the confidence gate of its guesses from held-out text (speed calibrate) ...")
        return calibrate(staging, Calibration(), progress=progress)


def _keep_file_blocks(tensors: list[Weight], out_dir: Path, stage_graphs: list[str], accuracy_level: int,
                      progress: Progress) -> dict:
    """Rewrite the stage graphs with the file's own blocks (Q4_0 and Q4_1; Q8_0 too with int8 activations, the
    only arithmetic with a fast 8-bit kernel), every other layer matrix quantized to int4 from its values. With
    int8 activations a Q8_0 embedding stays in its blocks as well: the tied head's 8-bit weights and the table
    the first stage reads, one file for both. Returns the manifest entries that record it."""
    settings = Quantization("int4", accuracy_level=accuracy_level)
    layer_matrices = _layer_matrices(tensors)
    digests = [weight_digest(w.values.T) for w in layer_matrices]  # the graphs hold weights as (in, out)
    known = {digest: blocks for digest, w in zip(digests, layer_matrices)
             if (blocks := _kept_blocks(w, accuracy_level)) is not None}
    used: set[bytes] = set()
    with progress.task("stage graphs given the file's blocks", total=len(stage_graphs)):
        for graph in stage_graphs:
            progress.note(f"writing {graph} with the file's own blocks ...")
            used |= quantize_graph(out_dir / graph, out_dir / graph, settings, known)
            progress.advance()
    kept = [w for digest, w in zip(digests, layer_matrices) if digest in used]
    again = sorted(w.gguf_name for digest, w in zip(digests, layer_matrices) if digest not in used)
    (embedding,) = [w for w in tensors if w.parameter == "embedding.weight"]
    table = _keep_embedding_blocks(embedding, out_dir, settings) if embedding.kind == "Q8_0" and \
        accuracy_level == INT8_ACTIVATIONS else {}
    float32 = sorted(w.gguf_name for w in tensors if w.values.ndim == 2 and not w.parameter.startswith("layers.")
                     and not (table and w is embedding))
    kinds = ", ".join(sorted({w.kind for w in kept})) or "none"
    progress.note(f"kept the file's own blocks of {len(kept)} of {len(layer_matrices)} layer matrices ({kinds})"
                  + (f" and of the embedding and tied head ({embedding.kind})" if table else "")
                  + (f"; quantized to int4 from their values: {', '.join(again)}" if again else "")
                  + (f"; float32: {', '.join(float32)}" if float32 else ""))
    arithmetic = "int8 activations" if accuracy_level == INT8_ACTIVATIONS else "float32 activations"
    return {"dtype": f"{'int4 and int8' if table or any(known[d].bits == 8 for d in used) else 'int4'} weights "
                     f"(MatMulNBits) from the GGUF file's own blocks, {arithmetic}; "
                     f"{'float32 embedding and head, ' if not table else ''}float32 caches",
            "quantization": {"weights": "int4", "block_size": BLOCK, "accuracy_level": accuracy_level,
                             "tool": f"GGUF blocks kept; onnxruntime {ort_version()} MatMulNBitsQuantizer for others",
                             "kept_from_gguf": sorted(w.gguf_name for w in kept + ([embedding] if table else [])),
                             "quantized_from_values": again, "float32": float32},
            **table}


def _layer_matrices(tensors: list[Weight]) -> list[Weight]:
    return [w for w in tensors if w.values.ndim == 2 and w.parameter.startswith("layers.")]


def _keeps(kind: str, accuracy_level: int) -> bool:
    """Whether a weight of this GGML type keeps its blocks: 8-bit ones only where the arithmetic runs them fast."""
    return BITS.get(kind) == 4 or (kind in BITS and accuracy_level == INT8_ACTIVATIONS)


def _kept_blocks(weight: Weight, accuracy_level: int) -> NBitsWeight | None:
    """The weight's own blocks as MatMulNBits weights, or None where it keeps none."""
    return nbits_weight(weight.kind, weight.stored) if _keeps(weight.kind, accuracy_level) else None


def _keep_embedding_blocks(embedding: Weight, out_dir: Path, settings: Quantization) -> dict:
    """The head over the embedding's Q8_0 blocks (8-bit MatMulNBits), whose weights are read from the files
    that also hold the embedding table; the float32 table goes. Returns the manifest's embedding entry."""
    import onnx

    blocks = nbits_weight(embedding.kind, embedding.stored)
    head = out_dir / HEAD_FILE
    quantize_graph(head, head, settings, {weight_digest(embedding.values.T): blocks})
    model = onnx.load(str(head))
    (node,) = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    arrays = {node.input[1]: (EMBEDDING_BLOCKS_FILE, blocks.packed), node.input[2]: (EMBEDDING_BLOCK_SCALES_FILE,
                                                                                     blocks.scales)}
    for tensor in model.graph.initializer:
        if tensor.name in arrays:
            file, array = arrays[tensor.name]
            store_outside(tensor, array, out_dir / file)
    onnx.save(model, str(head))
    (out_dir / EMBEDDING_FILE).unlink()
    V, d = embedding.values.shape
    return {"embedding": {"file": EMBEDDING_BLOCKS_FILE, "shape": [V, d], "dtype": "q8_0",
                          "block_scales": EMBEDDING_BLOCK_SCALES_FILE}}
