"""GGUF's 4- and 8-bit blocks as ONNX Runtime MatMulNBits weights, without dequantizing and requantizing.

llama.cpp stores a weight matrix (out, in) row by row, in blocks of 32 input channels:
  Q4_0  f16 scale d, 16 bytes of 4-bit q             w = d * (q - 8)
  Q4_1  f16 scale d, f16 minimum m, 16 bytes of q    w = d * q + m
and byte j of a block holds element j (low nibble) and element j + 16 (high nibble). MatMulNBits takes
B (out, blocks, 16) uint8 with element 2i in the low nibble of byte i and 2i + 1 in the high one, scales
(out * blocks) and zero points z, and computes w = scale * (q - z): the same q and d, with z = 8 (Q4_0, the
operator's default). Q4_1's offsets need z = -m / d, which only a float zero point holds, and ONNX Runtime
dequantizes the whole matrix on every call for those (measured: SmolLM2 ran 4x slower); so Q4_1 is written
with z = 0 and its offsets added as a product of block sums: x . w = sum_b d_b (x_b . q_b) + sum_b m_b sum(x_b).

  Q8_0  f16 scale d, 32 int8 q                          w = d * q
becomes 8-bit MatMulNBits, one byte an element, q + 128 with the operator's default zero point 128. Only
with int8 activations (accuracy level 4) does it have a fast kernel: with float arithmetic SmolLM2's
49152-word head took 128 ms a row on this x86 core, against 1.3 ms at level 4 and 5.3 ms in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # input channels per block in both formats
BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # the block types kept as they are, and their bits a weight
_HALF = np.dtype("<f2")


@dataclass(frozen=True)
class NBitsWeight:
    """A (K, N) weight of `MatMul(x, W)` as MatMulNBits blocks: N output channels, K input channels."""

    packed: np.ndarray  # (N, K / 32, 32 * bits / 8) uint8
    scales: np.ndarray  # (N * K / 32,) float32
    offsets: np.ndarray | None  # Q4_1's minimums (K / 32, N) float32, with zero points 0; None: zero point 2^(bits-1)
    bits: int = 4

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[1] * BLOCK, self.packed.shape[0]


def nbits_weight(kind: str, raw: np.ndarray) -> NBitsWeight | None:
    """GGUF rows of blocks (out, bytes a row) of type `kind` as MatMulNBits blocks, or None for a type other
    than Q4_0, Q4_1 and Q8_0."""
    if kind == "Q8_0":
        blocks = raw.reshape(raw.shape[0], -1, 2 + BLOCK)
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # (out, blocks, 32)
        return NBitsWeight(codes, _scales(blocks), None, bits=8)
    if kind not in BITS:
        return None
    header = 2 if kind == "Q4_0" else 4
    blocks = raw.reshape(raw.shape[0], -1, header + BLOCK // 2)
    q = _unpack_gguf_nibbles(blocks[..., header:])  # (out, blocks, 32) in 0..15
    if kind == "Q4_0":
        return NBitsWeight(_pack_nibbles(q), _scales(blocks), None)
    minimums = blocks[..., 2:4].copy().view(_HALF).astype(np.float32)[..., 0]  # (out, blocks)
    return NBitsWeight(_pack_nibbles(q), _scales(blocks), np.ascontiguousarray(minimums.T))


def _scales(blocks: np.ndarray) -> np.ndarray:
    return blocks[..., :2].copy().view(_HALF).astype(np.float32).reshape(-1)


def _unpack_gguf_nibbles(data: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) values: the 16 low nibbles first, then the 16 high ones."""
    return np.concatenate([data & 0x0F, data >> 4], axis=-1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) values in 0..15 -> (..., 16) bytes, element 2i low and 2i + 1 high."""
    q = q.astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)
