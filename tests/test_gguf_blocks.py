"""A GGUF file's 4- and 8-bit blocks written as MatMulNBits weights hold exactly the numbers llama.cpp reads."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from runtime.models.gguf_blocks import BLOCK, nbits_weight


def matmul_nbits_weight(packed: np.ndarray, scales: np.ndarray, zero_point: float) -> np.ndarray:
    """What MatMulNBits reads from its inputs: (N, K), element 2i in the low nibble of byte i."""
    N, blocks, _ = packed.shape
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, blocks, BLOCK).astype(np.float32)
    return ((q - zero_point) * scales.reshape(N, blocks, 1)).reshape(N, blocks * BLOCK)


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_4_bit_blocks_become_the_same_weights(kind):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 96)).astype(np.float32)
    weight[3, :BLOCK] = 0.25  # a block of one value: Q4_1 stores it with scale 0
    raw = quantize(weight, kind)
    llama_cpp = dequantize(raw, kind)  # (out, in), what llama.cpp computes with

    blocks = nbits_weight(kind.name, raw)
    assert blocks.shape == (96, 48)  # (K, N) of MatMul(x, W)
    if kind == GGMLQuantizationType.Q4_0:
        assert blocks.offsets is None
        np.testing.assert_array_equal(matmul_nbits_weight(blocks.packed, blocks.scales, 8), llama_cpp)
    else:  # zero point 0 plus one offset per block, added through the input's block sums
        offsets = np.repeat(blocks.offsets.T, BLOCK, axis=1)  # (N, K)
        np.testing.assert_array_equal(matmul_nbits_weight(blocks.packed, blocks.scales, 0) + offsets, llama_cpp)


def test_8_bit_blocks_become_the_same_weights_with_the_default_zero_point():
    weight = np.random.default_rng(1).standard_normal((48, 96)).astype(np.float32)
    raw = quantize(weight, GGMLQuantizationType.Q8_0)
    blocks = nbits_weight("Q8_0", raw)
    assert blocks.bits == 8 and blocks.offsets is None and blocks.shape == (96, 48)
    N, count, _ = blocks.packed.shape  # one byte an element; MatMulNBits' default 8-bit zero point is 128
    values = (blocks.packed.astype(np.float32) - 128) * blocks.scales.reshape(N, count, 1)
    np.testing.assert_array_equal(values.reshape(N, -1), dequantize(raw, GGMLQuantizationType.Q8_0))


def test_other_types_are_not_taken():
    raw = quantize(np.ones((4, 64), np.float32), GGMLQuantizationType.Q5_0)
    assert nbits_weight("Q5_0", raw) is None
    assert nbits_weight("F32", np.ones((4, 64), np.float32)) is None
