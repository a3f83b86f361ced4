"""Which of a bundle's products ONNX Runtime computes a single row of with a kernel of its own: every MatMulNBits
with float32 arithmetic (accuracy level 1), and on some processors those of 4-bit weights with int8 activations (level
4). Their graphs then never compute one row alone (runtime.executor.paired_rows).

It depends on the processor: with AVX-512 one row and several share a kernel, and a row's sums are the same bits
in any batch; on an AVX2 processor without it (an AMD EPYC of the Zen 3 generation, ONNX Runtime 1.31) a single row
of a 4-bit product differs from that row among others in the last bits (8-bit weights do not), whatever the
product's shape or the number of threads, while every count of two rows or more gives the same bits. Lossless
speculation needs a row's result not to depend on its batch, so such a machine never computes one row alone.
Measured by running a small product of that kind, once a machine: the answer is kept in the graph cache
beside the machine's graph copies, since the probe needs onnx, which a node otherwise never loads.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import onnxruntime as ort

from runtime.core.bundle import Bundle
from runtime.executor.onnx_session import PROVIDERS
from runtime.executor.paired_rows import FLOAT32_ARITHMETIC, INT8_ACTIVATIONS
from runtime.executor.prepacked_graphs import cache_root, cpu_fingerprint

K, N, BLOCK = 256, 64, 32  # a product of a few blocks a row, with zero points, as a quantized bundle's are
APART, SHARED = "apart", "shared"


def products_computing_one_row_apart(bundle: Bundle, device: str) -> frozenset[tuple[int, int]]:
    """The kinds, (weight bits, accuracy level), of MatMulNBits products that compute a single row with a kernel of
    their own on this device: those with float32 arithmetic always, those of 4-bit weights with int8 activations
    where this machine's CPU does (8-bit ones never do: tests/test_batch_invariance.py). Empty for a float bundle."""
    if not bundle.quantized:
        return frozenset()
    kinds = {(4, FLOAT32_ARITHMETIC), (8, FLOAT32_ARITHMETIC)}
    if device == "cpu" and int4_row_computed_apart():
        kinds.add((4, INT8_ACTIVATIONS))
    return frozenset(kinds)


@functools.cache
def int4_row_computed_apart() -> bool:
    """Whether one row of a 4-bit product with int8 activations gives other bits alone than beside another row."""
    remembered = cache_root() / f"int4-row-kernel-ort{ort.__version__}-{cpu_fingerprint()}"
    with contextlib.suppress(OSError):
        return remembered.read_text() == APART
    apart = _measured()
    with contextlib.suppress(OSError):  # a cache that cannot be written: the next process measures again
        remembered.parent.mkdir(parents=True, exist_ok=True)
        remembered.write_text(APART if apart else SHARED)
    return apart


def _measured() -> bool:
    from onnx import TensorProto, helper, numpy_helper  # only for bundles of such products: a node rarely holds onnx

    rng = np.random.default_rng(0)
    blocks = K // BLOCK
    weights = numpy_helper.from_array(rng.integers(0, 256, (N, blocks, BLOCK // 2), dtype=np.uint8), "weights")
    scales = numpy_helper.from_array(rng.uniform(0.01, 0.05, N * blocks).astype(np.float32), "scales")
    zero_points = numpy_helper.from_array(rng.integers(0, 256, N * ((blocks + 1) // 2), dtype=np.uint8),
                                          "zero_points")
    product = helper.make_node("MatMulNBits", ["x", "weights", "scales", "zero_points"], ["y"], domain="com.microsoft",
                               K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=INT8_ACTIVATIONS)
    graph = helper.make_graph([product], "one_row", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", N])],
                              [weights, scales, zero_points])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[PROVIDERS["cpu"]])
    x = rng.standard_normal((2, K)).astype(np.float32)
    alone, beside = session.run(None, {"x": x[:1]})[0], session.run(None, {"x": x})[0]
    return not np.array_equal(alone[0], beside[0])
