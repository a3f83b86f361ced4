"""The KV cache of one stage of one sequence: preallocated, appended in place, cut in O(1).

The position is the single source of truth: entry p holds the keys and values of the token at
position p, so rolling back speculative tokens only lowers `length`; the next write overwrites.
Keys are stored transposed, (L, 1, Hkv, hd, C), so attention multiplies by them without a copy.
"""

from __future__ import annotations

import numpy as np

from runtime.config import ModelConfig
from runtime.errors import SpeedError


class StageCache:
    def __init__(self, cfg: ModelConfig, capacity: int):
        L, Hkv, hd = cfg.n_distinct_layers, cfg.n_kv_heads, cfg.head_dim
        self.capacity = capacity
        self.length = 0
        self.keys = np.zeros((L, 1, Hkv, hd, capacity), dtype=np.float32)
        self.values = np.zeros((L, 1, Hkv, capacity, hd), dtype=np.float32)

    def feeds(self) -> dict[str, np.ndarray]:
        """Graph inputs for this cache; every array is a view, nothing is copied."""
        feeds = {"cache_length": np.array([self.length], dtype=np.int64)}
        for layer in range(len(self.keys)):
            feeds[f"cache_key_{layer}"] = self.keys[layer]
            feeds[f"cache_value_{layer}"] = self.values[layer]
        return feeds

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        """new_keys[l] (1, Hkv, hd, T), new_values[l] (1, Hkv, T, hd), written at `length`."""
        start, end = self.length, self.length + new_values[0].shape[2]
        if end > self.capacity:
            raise SpeedError(f"the sequence needs {end} positions but its cache holds {self.capacity}")
        for layer, (k, v) in enumerate(zip(new_keys, new_values)):
            self.keys[layer, :, :, :, start:end] = k
            self.values[layer, :, :, start:end] = v
        self.length = end

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise SpeedError(f"cannot truncate a cache of {self.length} entries to {length}")
        self.length = length
