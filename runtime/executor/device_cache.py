"""KV caches held by ONNX Runtime on a device, written in place by the stage graphs themselves.

On a GPU the host cannot write a cache without copying it across, so the cache lives in OrtValues on the
device, the stage graph writes its new entries into it (runtime.executor.cache_writing), and the host
keeps only the lengths, which is all a rollback changes. Any contiguous range of rows of a layer is bound
to a graph by address, without a copy. The same class holds a cache on the CPU provider, so every line of
it runs where there is no GPU; a host KVCache is bound the same way (CacheBinding).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtime.core.config import ModelConfig
from runtime.executor.kv_cache import CacheMemory, KVCache, tiled

FLOAT_BYTES = 4


class DeviceKVCache(KVCache):
    """A KVCache whose keys and values are OrtValues on `device` ("cuda" or "cpu"); only lengths are on the host.
    Growing it goes through the host (rare: a longer sequence than any before)."""

    def __init__(self, cfg: ModelConfig, *, rows: int, capacity: int, layers: int | None = None, device: str):
        self.device = device
        self._context = tiled(cfg.context_length)
        super().__init__(cfg, rows=rows, capacity=capacity, layers=layers)

    def resize(self, capacity: int) -> None:
        """Grow to the next power of two positions a row (at most the model's context) and never shrink: a GPU
        replays decode ticks bound to the cache's addresses (runtime.executor.decode_tiles), and each move makes
        them capture anew. So an idle GPU node keeps its largest cache."""
        if capacity > self.capacity:
            super().resize(min(1 << (tiled(capacity) - 1).bit_length(), self._context))

    def _store(self, keys: np.ndarray, values: np.ndarray) -> None:
        self._keys = ort.OrtValue.ortvalue_from_numpy(keys, self.device, 0)
        self._values = ort.OrtValue.ortvalue_from_numpy(values, self.device, 0)

    @property
    def keys(self) -> np.ndarray:
        """A host copy: decoding never reads the cache on the host."""
        return self._keys.numpy()

    @property
    def values(self) -> np.ndarray:
        return self._values.numpy()

    def memory(self) -> CacheMemory:
        return CacheMemory(self.device, self._keys.data_ptr(), self._values.data_ptr(), tuple(self._keys.shape()),
                           tuple(self._values.shape()))

    def write(self, rows: slice, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        raise TypeError("a device cache is written by the stage graphs themselves")


class CacheBinding:
    """Binds a call's rows of a cache to a graph's inputs and to the outputs that write them, by address."""

    def __init__(self, memory: CacheMemory):
        self.memory = memory
        self._rows_per_layer = memory.key_shape[1]
        self._rows = {"key": (memory.keys, list(memory.key_shape[2:])),  # one row: (Hkv, hd, C) or (Hkv, C, hd)
                      "value": (memory.values, list(memory.value_shape[2:]))}  # (Hkv, C, hd)

    def bind(self, binding: ort.IOBinding, rows: slice, layers: int, written: str) -> None:
        """Bind cache_key_{l} and cache_value_{l} of `rows` as inputs, and the same memory as the outputs
        {written}_key_{l} and {written}_value_{l}, for layers 0..layers-1."""
        for layer in range(layers):
            for kind, (base, row_shape) in self._rows.items():
                row_bytes = int(np.prod(row_shape)) * FLOAT_BYTES
                address = base + (layer * self._rows_per_layer + rows.start) * row_bytes
                shape = [rows.stop - rows.start, *row_shape]
                binding.bind_input(f"cache_{kind}_{layer}", self.memory.device, 0, np.float32, shape, address)
                binding.bind_output(f"{written}_{kind}_{layer}", self.memory.device, 0, np.float32, shape, address)
