"""KV caches for rows of (sequence, stage) pairs: preallocated, appended in place, cut in O(1).

The position is the single source of truth: entry p of a row holds the keys and values of the token
at position p, so rolling back speculative tokens only lowers the row's length and the next write
overwrites. Keys are stored transposed, (L, R, Hkv, hd, C), so attention multiplies by them without a
copy, and rows are the second axis so any contiguous range of rows is a zero-copy view per layer.
"""

from __future__ import annotations

import numpy as np

from runtime.core.config import ModelConfig
from runtime.core.errors import SpeedError

# Capacities are whole tiles: ONNX Runtime's attention reductions over the cache axis take a vector path
# for whole groups of lanes and another for the remainder, so a capacity of 33 gives other bits than 32 or
# 48 for the same row. With whole tiles a row's result is the same whatever cache it sits in (the masked
# positions add exact zeros), which lossless speculation needs (tests/test_batch_invariance.py).
CAPACITY_TILE = 16


def tiled(capacity: int) -> int:
    return -(-capacity // CAPACITY_TILE) * CAPACITY_TILE


class KVCache:
    def __init__(self, cfg: ModelConfig, *, rows: int, capacity: int, layers: int | None = None):
        """layers: per row, default the deepest stage's."""
        L, Hkv, hd = layers or cfg.max_stage_layers, cfg.n_kv_heads, cfg.head_dim
        capacity = tiled(capacity)
        self.capacity = capacity
        self.lengths = np.zeros(rows, dtype=np.int64)  # valid entries per row
        self.keys = np.zeros((L, rows, Hkv, hd, capacity), dtype=np.float32)
        self.values = np.zeros((L, rows, Hkv, capacity, hd), dtype=np.float32)

    def feeds(self, rows: slice, layers: int) -> dict[str, np.ndarray]:
        """Graph inputs of a stage with `layers` layers for a contiguous range of rows; every array is a
        view, nothing is copied."""
        feeds = {"cache_length": self.lengths[rows]}
        for layer in range(layers):
            feeds[f"cache_key_{layer}"] = self.keys[layer, rows]
            feeds[f"cache_value_{layer}"] = self.values[layer, rows]
        return feeds

    def append(self, row: int, new_keys: list[np.ndarray], new_values: list[np.ndarray], count: int) -> None:
        """Write the first `count` of new_keys[l] (Hkv, hd, T) and new_values[l] (Hkv, T, hd) at the row's end."""
        start = int(self.lengths[row])
        end = start + count
        if end > self.capacity:
            raise SpeedError(f"the sequence needs {end} positions but its cache holds {self.capacity}")
        for layer, (k, v) in enumerate(zip(new_keys, new_values)):
            self.keys[layer, row, :, :, start:end] = k[:, :, :count]
            self.values[layer, row, :, start:end] = v[:, :count]
        self.lengths[row] = end

    def truncate(self, row: int, length: int) -> None:
        if not 0 <= length <= self.lengths[row]:
            raise SpeedError(f"cannot truncate a cache row of {self.lengths[row]} entries to {length}")
        self.lengths[row] = length

    def resize(self, capacity: int) -> None:
        """Hold `capacity` positions per row (a whole tile), keeping every entry that fits (a copy: call it
        rarely)."""
        capacity = tiled(capacity)
        keep = min(capacity, self.capacity)
        keys = np.zeros(self.keys.shape[:-1] + (capacity,), dtype=np.float32)
        values = np.zeros(self.values.shape[:3] + (capacity, self.values.shape[-1]), dtype=np.float32)
        keys[..., :keep] = self.keys[..., :keep]
        values[:, :, :, :keep] = self.values[:, :, :, :keep]
        self.keys, self.values, self.capacity = keys, values, capacity
        np.minimum(self.lengths, capacity, out=self.lengths)
