"""Decode ticks run as fixed tiles through buffers at fixed addresses, so a GPU can replay them as CUDA graphs.

A GPU running a small model mostly waits for the host to launch its kernels: a stage call is dozens of them.
ONNX Runtime's CUDA provider can capture a call's kernels once as a CUDA graph and replay them with one
launch, but only for a call whose every input and output has the same shape and the same device address as
when it was captured. A decode tick (one new token a row) is made such a call here: it runs over every row of
its cache (the rows without an item of their own ride along, as in any span of rows: their entries land beyond
their lengths and their results are dropped), its hidden states and cache lengths are copied into input buffers
bound once, and its output lands in a buffer bound once. Each (graph, cache memory) pair gets its own capture
id; prompt chunks, whose shapes vary, run uncaptured (SKIP).

On the CPU provider the same tiles run without a capture (ONNX Runtime ignores the id there), which is how
every line here is tested without a GPU; on the CPU the host's own path is faster, so only tests ask for it.
On CUDA they are the default; SPEED_CUDA_GRAPHS=0 in a node's environment turns them off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from runtime.executor.cache_writing import WRITES
from runtime.executor.device_cache import CacheBinding
from runtime.executor.kv_cache import KVCache

CAPTURE_ID = "gpu_graph_id"  # ONNX Runtime's run option naming a call's captured graph
SKIP = "-1"  # its value for a call that is neither captured nor replayed
MAX_CAPTURES = 32  # per model: ONNX Runtime keeps each captured graph as long as its session
SWITCH = "SPEED_CUDA_GRAPHS"  # "0" in the environment: no tiles on CUDA either


def tiles_by_default(device: str) -> bool:
    return device == "cuda" and os.environ.get(SWITCH, "1") != "0"


def run_options(capture_id: str) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry(CAPTURE_ID, capture_id)
    return options


UNCAPTURED = run_options(SKIP)


@dataclass
class _Tile:
    hidden: ort.OrtValue  # (R, 1, d) on the device, bound as the input
    lengths: ort.OrtValue  # (R,) int64 on the device
    out: ort.OrtValue  # (R, 1, d) on the device, bound as the output
    host_hidden: np.ndarray  # (R, 1, d): the rows of the call written into it, the rest left as they were
    binding: ort.IOBinding
    options: ort.RunOptions


class DecodeTiles:
    """The tiles of one model's stage graphs on `device`, one a (graph, cache memory) pair. A cache that grows
    moves, so its pair gets a new tile: the first MAX_CAPTURES tiles are captured, later ones run uncaptured, and
    at most MAX_CAPTURES are kept."""

    def __init__(self, device: str, d_model: int):
        self.device = device
        self.d_model = d_model
        self._tiles: dict[tuple, _Tile] = {}
        self._captures = 0  # capture ids given out; ONNX Runtime keeps a captured graph as long as its session

    def run(self, session: ort.InferenceSession, layers: int, hidden: np.ndarray, cache: KVCache, rows: slice
            ) -> np.ndarray:
        """hidden (B, 1, d) of `rows` -> their hidden states (B, 1, d); writes their new entries like any call."""
        tile = self._tile(session, layers, cache)
        tile.host_hidden[rows] = hidden
        tile.hidden.update_inplace(tile.host_hidden)
        tile.lengths.update_inplace(cache.lengths)
        session.run_with_iobinding(tile.binding, tile.options)
        return tile.out.numpy()[rows]

    def _tile(self, session: ort.InferenceSession, layers: int, cache: KVCache) -> _Tile:
        key = (id(session), cache.memory())
        tile = self._tiles.pop(key, None)
        if tile is None:
            tile = self._new_tile(session, layers, cache)
            if len(self._tiles) >= MAX_CAPTURES:  # the least recently used goes (a cache that grew, most often)
                del self._tiles[next(iter(self._tiles))]
        self._tiles[key] = tile  # last: the most recently used
        return tile

    def _new_tile(self, session: ort.InferenceSession, layers: int, cache: KVCache) -> _Tile:
        rows = len(cache.lengths)
        host_hidden = np.zeros((rows, 1, self.d_model), np.float32)
        hidden = ort.OrtValue.ortvalue_from_numpy(host_hidden, self.device, 0)
        lengths = ort.OrtValue.ortvalue_from_numpy(cache.lengths, self.device, 0)
        out = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1, self.d_model], np.float32, self.device, 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input("hidden", hidden)
        binding.bind_ortvalue_input("cache_length", lengths)
        binding.bind_ortvalue_output("hidden_out", out)
        CacheBinding(cache.memory()).bind(binding, slice(0, rows), layers, WRITES)
        if self._captures < MAX_CAPTURES:
            self._captures += 1
            options = run_options(str(self._captures))  # ids from 1: ONNX Runtime keeps 0 for itself
        else:
            options = UNCAPTURED
        return _Tile(hidden, lengths, out, host_hidden, binding, options)
