"""KV caches for rows of (sequence, stage) pairs: preallocated, written in place, cut in O(1).

The position is the single source of truth: entry p of a row holds the keys and values of the token
at position p, so rolling back speculative tokens only lowers the row's length and the next write
overwrites. Keys are stored transposed, (L, R, Hkv, hd, C), so attention multiplies by them without a
copy, and rows are the second axis so any contiguous range of rows is a zero-copy view per layer. Graphs
with fused attention (runtime.executor.fused_attention) read keys laid out like values instead,
(L, R, Hkv, C, hd), and write the cache themselves.
"""

from __future__ import annotations

from typing import NamedTuple

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


class CacheMemory(NamedTuple):
    """Where a cache's keys (L, R, Hkv, hd, C) and values (L, R, Hkv, C, hd) are, to bind rows of them by address."""

    device: str  # ONNX Runtime's name for it: "cpu", "cuda"
    keys: int  # addresses
    values: int
    key_shape: tuple[int, ...]
    value_shape: tuple[int, ...]


class KVCache:
    def __init__(self, cfg: ModelConfig, *, rows: int, capacity: int, layers: int | None = None,
                 keys_by_position: bool = False):
        """layers: per row, default the deepest stage's. keys_by_position: keys laid out like values, for graphs
        with fused attention, with one spare position a row beyond the capacity: a fused graph writes a row's new
        entry at its length even when the row only rides along in the call, and such a row may be full."""
        self._shape = (layers or cfg.max_stage_layers, rows, cfg.n_kv_heads, cfg.head_dim)
        self.keys_by_position = keys_by_position
        self.capacity = tiled(capacity)
        self.lengths = np.zeros(rows, dtype=np.int64)  # valid entries per row
        self._store(*self._empty(self.capacity))

    def _empty(self, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        L, rows, Hkv, hd = self._shape
        positions = capacity + 1 if self.keys_by_position else capacity
        values = np.zeros((L, rows, Hkv, positions, hd), dtype=np.float32)
        return (np.zeros_like(values) if self.keys_by_position else np.zeros((L, rows, Hkv, hd, capacity), np.float32),
                values)

    def _store(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Hold these arrays as the cache (runtime.executor.device_cache moves them to a device)."""
        self.keys, self.values = keys, values

    def position_keys(self) -> np.ndarray:
        """The keys as (L, R, Hkv, positions, hd) whatever their layout: a view, to read them."""
        return self.keys if self.keys_by_position else self.keys.swapaxes(-1, -2)

    def memory(self) -> CacheMemory:
        return CacheMemory("cpu", self.keys.ctypes.data, self.values.ctypes.data, self.keys.shape, self.values.shape)

    def feeds(self, rows: slice, layers: int) -> dict[str, np.ndarray]:
        """Graph inputs of a stage with `layers` layers for a contiguous range of rows; every array is a
        view, nothing is copied."""
        feeds = {"cache_length": self.lengths[rows]}
        for layer in range(layers):
            feeds[f"cache_key_{layer}"] = self.keys[layer, rows]
            feeds[f"cache_value_{layer}"] = self.values[layer, rows]
        return feeds

    def write(self, rows: slice, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        """Write each row's new entries, new_keys[l] (B, Hkv, hd, T) and new_values[l] (B, Hkv, T, hd), at its
        length, as far as it has room; lengths stay (`advance` keeps them). What a cache-writing graph does
        (runtime.executor.cache_writing): a row riding along in a call gets entries beyond its length."""
        if self.keys_by_position:
            raise TypeError("a cache with keys by position is written by the stage graphs themselves")
        T = new_keys[0].shape[-1]
        for r, row in enumerate(range(rows.start, rows.stop)):
            start = int(self.lengths[row])
            end = min(start + T, self.capacity)
            for layer, (k, v) in enumerate(zip(new_keys, new_values)):  # slices: 5x faster than one fancy index
                self.keys[layer, row, :, :, start:end] = k[r, :, :, : end - start]
                self.values[layer, row, :, start:end] = v[r, :, : end - start]

    def check_room(self, row: int, count: int) -> None:
        end = int(self.lengths[row]) + count
        if end > self.capacity:
            raise SpeedError(f"the sequence needs {end} positions but its cache holds {self.capacity}")

    def advance(self, row: int, count: int) -> None:
        """Count `count` more entries of the row as valid: the ones the last call wrote."""
        self.check_room(row, count)
        self.lengths[row] += count

    def truncate(self, row: int, length: int) -> None:
        if not 0 <= length <= self.lengths[row]:
            raise SpeedError(f"cannot truncate a cache row of {self.lengths[row]} entries to {length}")
        self.lengths[row] = length

    def resize(self, capacity: int) -> None:
        """Hold `capacity` positions per row (a whole tile), keeping every entry that fits (a copy: call it
        rarely)."""
        capacity = tiled(capacity)
        keep = min(capacity, self.capacity)
        old_keys, old_values = self.keys, self.values
        keys, values = self._empty(capacity)
        if self.keys_by_position:
            keys[:, :, :, :keep] = old_keys[:, :, :, :keep]
        else:
            keys[..., :keep] = old_keys[..., :keep]
        values[:, :, :, :keep] = old_values[:, :, :, :keep]
        self._store(keys, values)
        self.capacity = capacity
        np.minimum(self.lengths, capacity, out=self.lengths)
