"""Decode ticks run as fixed tiles through buffers at fixed addresses, so a GPU can replay them as CUDA graphs.

A GPU running a small model mostly waits for the host to launch its kernels: a stage call is dozens of them.
ONNX Runtime's CUDA provider can capture a call's kernels once as a CUDA graph and replay them with one
launch, but only for a call whose every input and output has the same shape and the same device address as
when it was captured. A decode tick (one new token a row) is made such a call here: it runs over every row of
its cache (the rows without an item of their own ride along, as in any span of rows: their entries land beyond
their lengths and their results are dropped), its rows' plan (cache lengths, where each row's input is, token ids) and
any hidden states it takes from the host are copied into input buffers bound once, and its items' outputs land in
the cache's buffer of kept states (runtime.executor.kept_states), where its inputs from earlier calls are read too.
Each (graph, cache memory) pair gets its own capture id; prompt chunks, whose shapes vary, run uncaptured (SKIP).

On the CPU provider the same tiles run without a capture (ONNX Runtime ignores the id there), which is how
every line here is tested without a GPU; on the CPU the host's own path is faster, so only tests ask for it.
On CUDA they are the default; SPEED_CUDA_GRAPHS=0 in a node's environment turns them off.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from runtime.executor.cache_writing import WRITES
from runtime.executor.device_cache import CacheBinding
from runtime.executor.kept_states import EMBEDDING, KEPT_STATES, RIDES, ROW_PLAN, STATES
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
    plan: ort.OrtValue  # (3, R) int64 on the device: the rows' plan (runtime.executor.kept_states)
    host_hidden: np.ndarray  # (R, 1, d): the rows of the call written into it, the rest left as they were
    host_plan: np.ndarray  # (3, R)
    binding: ort.IOBinding
    options: ort.RunOptions
    out: ort.OrtValue  # (R, 1, d): every row's output, bound because the graph gives it; read are the kept states


class DecodeTiles:
    """The tiles of one model's stage graphs on `device`, one a (graph, cache memory) pair, and each cache's kept
    states. A cache that grows moves, so its pair gets a new tile: the first MAX_CAPTURES tiles are captured, later
    ones run uncaptured, and at most MAX_CAPTURES are kept. A cache's states never move: they are a row each."""

    def __init__(self, device: str, d_model: int, embedding: ort.OrtValue):
        """embedding: the token embeddings on the device, (V, d) (a dummy where no call looks a token up)."""
        self.device = device
        self.d_model = d_model
        self.embedding = embedding
        self._tiles: dict[tuple, _Tile] = {}
        self._captures = 0  # capture ids given out; ONNX Runtime keeps a captured graph as long as its session
        self._states: weakref.WeakKeyDictionary[KVCache, ort.OrtValue] = weakref.WeakKeyDictionary()

    def states(self, cache: KVCache) -> ort.OrtValue:
        """The cache's kept states, (R, 1, d) on the device, made on first use."""
        states = self._states.get(cache)
        if states is None:
            states = ort.OrtValue.ortvalue_from_numpy(np.zeros((len(cache.lengths), 1, self.d_model), np.float32),
                                                      self.device, 0)
            self._states[cache] = states
        return states

    def run(self, session: ort.InferenceSession, layers: int, cache: KVCache, rows: slice, sources: np.ndarray,
            tokens: np.ndarray, hidden: np.ndarray | None) -> None:
        """One new token a row of `rows`, whose inputs are where sources (B,) says (runtime.executor.kept_states): kept
        states, the embeddings of tokens (B,), or hidden (B, 1, d); writes their new entries like any call, and their
        outputs into the cache's kept states."""
        tile = self._tile(session, layers, cache)
        plan = tile.host_plan
        plan[0] = cache.lengths
        plan[1] = RIDES
        plan[1, rows] = sources
        plan[2, rows] = tokens
        tile.plan.update_inplace(plan)
        if hidden is not None:
            tile.host_hidden[rows] = hidden
            tile.hidden.update_inplace(tile.host_hidden)
        session.run_with_iobinding(tile.binding, tile.options)

    def read(self, cache: KVCache, rows: slice | list[int]) -> np.ndarray:
        """These rows' kept states, (len(rows), 1, d), copied to the host (on the CPU provider a value's array is its
        memory, which the next call writes)."""
        return np.array(self.states(cache).numpy()[rows])

    def _tile(self, session: ort.InferenceSession, layers: int, cache: KVCache) -> _Tile:
        # a cache's states by address too: a new cache may have a dead one's cache memory, never its states, which
        # the dead one's tile holds
        key = (id(session), cache.memory(), self.states(cache).data_ptr())
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
        host_plan = np.zeros((3, rows), np.int64)
        hidden = ort.OrtValue.ortvalue_from_numpy(host_hidden, self.device, 0)
        plan = ort.OrtValue.ortvalue_from_numpy(host_plan, self.device, 0)
        out = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1, self.d_model], np.float32, self.device, 0)
        states = self.states(cache)
        binding = session.io_binding()
        binding.bind_ortvalue_input("hidden", hidden)
        binding.bind_ortvalue_input(ROW_PLAN, plan)
        binding.bind_ortvalue_input(STATES, states)
        binding.bind_ortvalue_input(EMBEDDING, self.embedding)
        binding.bind_ortvalue_output("hidden_out", out)
        binding.bind_ortvalue_output(KEPT_STATES, states)  # in place: a row's input is read before any output is
        CacheBinding(cache.memory()).bind(binding, slice(0, rows), layers, WRITES)
        if self._captures < MAX_CAPTURES:
            self._captures += 1
            options = run_options(str(self._captures))  # ids from 1: ONNX Runtime keeps 0 for itself
        else:
            options = UNCAPTURED
        return _Tile(hidden, plan, host_hidden, host_plan, binding, options, out)
