"""`speed quantize`: a bundle whose weight matrices are stored in 4 or 8 bits.

Every MatMul with a constant weight, in the stage graphs and the head (the tied LM head included), becomes
ONNX Runtime's block-quantized MatMulNBits, made by `onnxruntime.quantization`'s n-bit quantizer: per block
of `block_size` input channels, one float32 scale and one zero point (asymmetric). The embedding table,
which the stage-0 node reads row by row, is stored as int8 with one scale per row. Activations, norms,
attention and the KV caches stay float32. Weights quantized already (a GGUF file's 4-bit blocks) are written
as they are (`quantize_graph`'s known weights), not quantized a second time.

A quantized bundle is a different model from its source: speculative decoding of it equals sequential
decoding of it token for token, as for any bundle; how closely it follows the float32 source is
measured, not promised.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from runtime.core.bundle import (
    EMBEDDING_Q8_FILE,
    EMBEDDING_SCALES_FILE,
    carry_other_files,
    load_bundle,
    other_manifest_entries,
    write_manifest,
)
from runtime.core.errors import SpeedError
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.core.staging import check_directory_free, staged_directory
from runtime.models.gguf_blocks import BLOCK, NBitsWeight

WEIGHTS = {"int4": 4, "int8": 8}
# MatMulNBits' arithmetic (its accuracy level): float32, or int8 activations quantized per block of the input,
# which has fast kernels for 4- and 8-bit weights on CPUs and gives a row the same bits in any batch
# (tests/test_batch_invariance.py); measured in docs/performance.md ("Batch invariance", "SmolLM2 fast path").
FLOAT_ARITHMETIC, INT8_ACTIVATIONS = 1, 4
ACCURACY_LEVELS = (FLOAT_ARITHMETIC, INT8_ACTIVATIONS)
ACCURACY_LEVEL = INT8_ACTIVATIONS
INT8_ON_CPU = ("note: int8 weights with float32 arithmetic decode slowly on CPUs (SmolLM2-135M's head: 128 ms a row "
               "against 1.3 ms with int8 activations on one x86 core; ONNX Runtime has no fast kernel for them): "
               "choose them for their accuracy, or for a GPU")
# the manifest keys write_manifest derives itself; every other key of the source manifest is carried over
@dataclass(frozen=True)
class Quantization:
    weights: str = "int4"  # int4 or int8
    block_size: int = 32  # input channels per scale; a power of two, at least 16 (as llama.cpp's Q4_1: 32)
    accuracy_level: int = ACCURACY_LEVEL  # MatMulNBits' arithmetic

    def __post_init__(self) -> None:
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise SpeedError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))}, "
                             f"got {self.accuracy_level}")
        if self.weights not in WEIGHTS:
            raise SpeedError(f"--weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise SpeedError(f"--block-size must be a power of two, at least 16, got {self.block_size}")


def quantize_bundle(source: Path, out_dir: Path, settings: Quantization, *, force: bool = False,
                    progress: Progress = NO_PROGRESS) -> Path:
    """Write the quantized copy of the bundle at `source` to `out_dir`, completely or not at all."""
    check_directory_free(out_dir, force=force)
    bundle = load_bundle(source)
    if settings.weights == "int8" and settings.accuracy_level == FLOAT_ARITHMETIC:
        progress.note(INT8_ON_CPU)
    if "quantization" in bundle.manifest:
        raise SpeedError(f"bundle {source} is quantized already; quantize its float32 source instead")
    with staged_directory(out_dir, force=force) as staging:
        graphs = sorted({path.name for path in bundle.stage_graphs}) + [bundle.head_graph.name]
        with progress.task("graphs quantized", total=len(graphs)):
            for name in graphs:
                progress.note(f"quantizing {name} to {settings.weights} ...")
                quantize_graph(bundle.path / name, staging / name, settings)
                progress.advance()
        progress.note("storing the embedding table as int8 rows ...")
        _write_int8_rows(bundle.embedding(), staging)
        carried = carry_other_files(bundle, staging, skip={*graphs, bundle.manifest["embedding"]["file"]})
        extra = other_manifest_entries(bundle)
        write_manifest(
            staging, name=f"{bundle.manifest['name']}-{settings.weights}", model_config=bundle.config,
            stage_graphs=[path.name for path in bundle.stage_graphs], eos_token_id=bundle.eos_token_id, **extra,
            dtype=f"{settings.weights} weights (MatMulNBits), "
                  f"{'int8' if settings.accuracy_level == INT8_ACTIVATIONS else 'float32'} activations, float32 caches",
            embedding={"file": EMBEDDING_Q8_FILE, "shape": [bundle.config.vocab_size, bundle.config.d_model],
                       "dtype": "int8", "row_scales": EMBEDDING_SCALES_FILE},
            quantization={"weights": settings.weights, "block_size": settings.block_size,
                          "accuracy_level": settings.accuracy_level, "symmetric": False,
                          "tool": f"onnxruntime {ort_version()} MatMulNBitsQuantizer",
                          "source": {"name": bundle.manifest["name"], "sha256": bundle.sha256},
                          "carried_unchanged": carried})
    return out_dir


def quantize_graph(path: Path, out: Path, settings: Quantization, known: dict[bytes, NBitsWeight] | None = None
                   ) -> set[bytes]:
    """Fold the weight transposes first (the exported graphs keep them), so every weight is a constant
    MatMul input; write the `known` ones (by weight_digest) as they are, let ONNX Runtime's quantizer replace
    the rest, and return the digests of the known weights used."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with tempfile.TemporaryDirectory() as scratch:
        folded = Path(scratch) / "folded.onnx"
        _fold_constants(path, folded)
        model = onnx.load(str(folded))
    used, offset_products = _write_known_weights(model, known or {}, settings.accuracy_level)
    quantizer = MatMulNBitsQuantizer(model, bits=WEIGHTS[settings.weights], block_size=settings.block_size,
                                     is_symmetric=False, accuracy_level=settings.accuracy_level,
                                     nodes_to_exclude=offset_products)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one line per MatMul otherwise
    quantizer.process()
    if not any(node.op_type == "MatMulNBits" for node in quantizer.model.model.graph.node):
        raise SpeedError(f"{path.name} has no weight matrix ONNX Runtime's quantizer can replace")
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return used


def _write_known_weights(model, known: dict[bytes, NBitsWeight], accuracy_level: int
                         ) -> tuple[set[bytes], list[str]]:
    """Replace every MatMul whose constant weight is known by MatMulNBits over its blocks (plus, for blocks
    with offsets, the product of the input's block sums and the offsets). Known weights read by one input
    (a layer's query, key and value; its gate and up) become one product whose output is split: one call
    of a wider product costs less than several (SmolLM2 has 7 matrices a layer, in 4 such groups). Returns
    the digests used and the names of the float MatMuls added, which must stay float."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    groups: dict[tuple, list[_KnownProduct]] = {}  # by input: products a wider one can replace
    for position, node in enumerate(graph.node):
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        digest = weight_digest(numpy_helper.to_array(weight)) if weight is not None else None
        blocks = known.get(digest)
        if blocks is not None:
            key = (node.input[0], blocks.shape[0], blocks.bits, blocks.offsets is None)
            groups.setdefault(key, []).append(_KnownProduct(position, node.output[0], weight.name, blocks, digest))
    replaced = {member.position: member for members in groups.values() for member in members}
    first_of_group = {members[0].position: members for members in groups.values()}
    used, nodes, offset_products = set(), [], []
    for position, node in enumerate(graph.node):
        if position not in replaced:
            nodes.append(node)
        elif position in first_of_group:
            members = first_of_group[position]
            name = "_".join(member.weight for member in members)
            outputs = [member.output for member in members]
            y = outputs[0] if len(members) == 1 else f"{name}_joined"
            nodes += _known_product(graph, initializers, node.input[0], y, name,
                                    _side_by_side([member.blocks for member in members]), accuracy_level,
                                    offset_products)
            if len(members) > 1:
                widths = numpy_helper.from_array(np.array([m.blocks.shape[1] for m in members], np.int64),
                                                 f"{name}_widths")
                graph.initializer.append(widths)
                nodes.append(helper.make_node("Split", [y, widths.name], outputs, axis=-1))
            used |= {member.digest for member in members}
    graph.ClearField("node")
    graph.node.extend(nodes)
    folded = {member.weight for member in replaced.values()}
    for tensor in [tensor for tensor in graph.initializer if tensor.name in folded]:
        graph.initializer.remove(tensor)  # each folded weight feeds one MatMul
    if folded and not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return used, offset_products


class _KnownProduct(NamedTuple):
    """A MatMul of the graph whose constant weight is known in blocks."""

    position: int  # in the graph's node order
    output: str
    weight: str  # the float weight's initializer, which goes
    blocks: NBitsWeight
    digest: bytes


def _side_by_side(parts: list[NBitsWeight]) -> NBitsWeight:
    """Weights with the same input channels as one weight of all their output channels, in order."""
    if len(parts) == 1:
        return parts[0]
    offsets = None if parts[0].offsets is None else np.concatenate([part.offsets for part in parts], axis=1)
    return NBitsWeight(np.concatenate([part.packed for part in parts]), np.concatenate([part.scales for part in parts]),
                       offsets, bits=parts[0].bits)


def _known_product(graph, initializers: dict, x: str, y: str, name: str, blocks: NBitsWeight, accuracy_level: int,
                   offset_products: list[str]) -> list:
    """The nodes computing y = x @ W for W in blocks; their arrays become initializers named after `name`."""
    from onnx import helper, numpy_helper

    K, N = blocks.shape
    arrays = {f"{name}_Q{blocks.bits}": blocks.packed, f"{name}_scales": blocks.scales}
    if blocks.offsets is None:
        nodes = [_matmul_nbits(x, arrays, y, blocks, accuracy_level)]
    else:
        arrays[f"{name}_zero_points"] = np.zeros((N, (K // BLOCK + 1) // 2), np.uint8)  # two 4-bit zeros a byte
        sums = f"block_sums_{K}"
        if sums not in initializers:  # (K, K / 32): 1 where input channel k is in block b
            initializers[sums] = numpy_helper.from_array(np.repeat(np.eye(K // BLOCK, dtype=np.float32), BLOCK, 0), sums)
            graph.initializer.append(initializers[sums])
        graph.initializer.append(numpy_helper.from_array(blocks.offsets, f"{name}_offsets"))
        offset_products += [f"{name}_block_sums", f"{name}_offsets"]
        nodes = [_matmul_nbits(x, arrays, f"{y}_scaled", blocks, accuracy_level),
                 helper.make_node("MatMul", [x, sums], [f"{y}_block_sums"], name=offset_products[-2]),
                 helper.make_node("MatMul", [f"{y}_block_sums", f"{name}_offsets"], [f"{y}_offsets"],
                                  name=offset_products[-1]),
                 helper.make_node("Add", [f"{y}_scaled", f"{y}_offsets"], [y])]
    graph.initializer.extend(numpy_helper.from_array(array, key) for key, array in arrays.items())
    return nodes


def _matmul_nbits(x: str, arrays: dict[str, np.ndarray], y: str, blocks: NBitsWeight, accuracy_level: int):
    from onnx import helper

    K, N = blocks.shape
    return helper.make_node("MatMulNBits", [x, *arrays], [y], domain="com.microsoft", K=K, N=N, bits=blocks.bits,
                            block_size=BLOCK, accuracy_level=accuracy_level)


def weight_digest(weight: np.ndarray) -> bytes:
    """Identifies a float32 weight matrix as a graph stores it, (K, N)."""
    return hashlib.sha256(np.ascontiguousarray(weight, dtype=np.float32).tobytes()).digest()


def _fold_constants(path: Path, out: Path) -> None:
    """ONNX Runtime's basic optimizations only: portable to every machine, unlike the full level."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _write_int8_rows(table: np.ndarray, out_dir: Path) -> None:
    """(V, d) float32 -> int8 (V, d) and one float32 scale per row (symmetric: row max maps to 127)."""
    scales = np.maximum(np.abs(table).max(axis=1), np.finfo(np.float32).tiny) / 127.0  # (V,)
    values = np.clip(np.rint(table / scales[:, None]), -127, 127).astype(np.int8)  # (V, d)
    values.tofile(out_dir / EMBEDDING_Q8_FILE)
    scales.astype("<f4").tofile(out_dir / EMBEDDING_SCALES_FILE)


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
