"""Run a bundle's graphs with ONNX Runtime: embedding lookup, stages and the shared classifier."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.core.bundle import Bundle
from runtime.core.errors import SpeedError
from runtime.executor.cache_writing import WRITES
from runtime.executor.device_cache import CacheBinding, DeviceKVCache
from runtime.executor.kv_cache import KVCache
from runtime.executor.onnx_session import create_session

KEPT_BINDINGS = 256  # (session, span of rows, cache memory) bindings kept for the next call


def stage_outputs(layers: int) -> list[str]:
    return ["hidden_out", *(f"new_key_{l}" for l in range(layers)), *(f"new_value_{l}" for l in range(layers))]


class OnnxStageModel:
    """One session per distinct stage graph: stages that share weights share a session. Only the graphs
    of `stages` are loaded (default all), so a node holds in memory just what it may run.

    writes_cache: the stage and exit graphs write their new cache entries themselves, into caches bound by
    address (runtime.executor.cache_writing), instead of returning them for the host to write. The default
    on a GPU, where the caches then stay on the device (DeviceKVCache); on the CPU writing from the host is
    faster (the graph's writes cost SmolLM2 0.6 ms a token there, docs/performance.md), so it is used only
    to check the GPU's path where there is no GPU."""

    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int = 0, stages: Iterable[int] | None = None,
                 writes_cache: bool | None = None):
        self.config = bundle.config
        self.device = device
        self.writes_cache = device != "cpu" if writes_cache is None else writes_cache
        self._graph_ids = bundle.graph_ids
        # where a single row is computed with another kernel (Bundle.one_row_computed_apart), the graphs
        # always get at least two rows, so a token's result never depends on what it is batched with, which
        # lossless speculation needs
        self._never_one_row = bundle.one_row_computed_apart

        def session(path: Path, *, with_cache: bool = False):
            return create_session(path, device=device, threads=threads, sha256=bundle.file_sha256(path),
                                  writes_cache=with_cache and self.writes_cache)

        graphs = bundle.stage_graphs
        self.stages = frozenset(range(len(graphs)) if stages is None else stages)  # the stages it can run
        sessions = {path: session(path, with_cache=True) for path in {graphs[stage] for stage in self.stages}}
        self._stage_sessions = {stage: sessions[graphs[stage]] for stage in self.stages}
        self._head = session(bundle.head_graph)
        self.provider = self._head.get_providers()[0]
        guess_head = bundle.guess_head_graph
        self._guess_head = session(guess_head) if guess_head is not None else self._head
        self.guess_vocabulary = bundle.guess_vocabulary()
        self._embedding = bundle.embedding()
        self.exit_maps = bundle.exit_maps()
        self._exit_sessions = {stage: session(path, with_cache=True) for stage, path in bundle.exit_layer_graphs().items()
                               if stage in self.stages}
        self.exit_layer_stages = frozenset(self._exit_sessions)
        self._layers = [len(self.config.stage_layers(s)) for s in range(self.config.n_stages)]
        self._bindings: dict[tuple, ort.IOBinding] = {}

    def new_cache(self, *, rows: int, capacity: int, layers: int | None = None) -> KVCache:
        """A cache for these graphs: on the device when they write it there; at least two rows where one row
        is computed apart (the second gives a single token a neighbour)."""
        rows = max(rows, 2) if self._never_one_row else rows
        if self.writes_cache and self.device != "cpu":
            return DeviceKVCache(self.config, rows=rows, capacity=capacity, layers=layers, device=self.device)
        return KVCache(self.config, rows=rows, capacity=capacity, layers=layers)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """(B, T) int64 -> (B, T, d) float32."""
        return self._embedding[token_ids]

    def graph_of(self, stage: int) -> int:
        """Stages with the same graph id share weights and can run in one call."""
        return self._graph_ids[stage]

    def run_stage(self, stage: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray:
        """hidden (B, T, d) of the tokens after each row's cache length, B = rows of `rows` -> hidden (B, T, d).
        Each row's new keys and values are written at its length, as far as it has room (KVCache.write);
        the caller advances the lengths of the rows it keeps."""
        if self._never_one_row and hidden.shape[:2] == (1, 1):
            return self._run_beside_a_neighbour(stage, hidden, cache, rows.start)
        return self._run(self._stage_sessions[stage], self._layers[stage], hidden, cache, rows)

    def run_exit_layer(self, stage: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray:
        """The stage's one-layer exit: a stage graph of one layer over its own cache (one layer per row)."""
        return self._run(self._exit_sessions[stage], 1, hidden, cache, rows)

    def _run(self, session, layers: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray:
        if not self.writes_cache:
            out = session.run(stage_outputs(layers), {"hidden": hidden, **cache.feeds(rows, layers)})
            cache.write(rows, out[1 : 1 + layers], out[1 + layers :])
            return out[0]
        binding = self._binding(session, layers, cache, rows)
        binding.bind_output("hidden_out", "cpu")  # again: a bound output keeps the last call's shape
        binding.bind_cpu_input("hidden", np.ascontiguousarray(hidden))
        binding.bind_cpu_input("cache_length", cache.lengths[rows])
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _binding(self, session, layers: int, cache: KVCache, rows: slice) -> ort.IOBinding:
        """The call's binding, its cache rows bound once per span of a cache's memory: binding costs about 10 us
        a tensor, most of a small stage's call."""
        memory = cache.memory()
        key = (id(session), rows.start, rows.stop, memory)
        binding = self._bindings.get(key)
        if binding is None:
            if len(self._bindings) >= KEPT_BINDINGS:
                self._bindings.clear()
            binding = session.io_binding()
            binding.bind_output("hidden_out", "cpu")  # the first output bound is the first returned
            CacheBinding(memory).bind(binding, rows, layers, WRITES)
            self._bindings[key] = binding
        return binding

    def _run_beside_a_neighbour(self, stage: int, hidden: np.ndarray, cache: KVCache, row: int) -> np.ndarray:
        """Run one token as one of two rows, the other a neighbouring cache row whose result is dropped
        (rows are independent in every op, the neighbour is a view: nothing is copied, and it gets an entry
        only beyond its length)."""
        if len(cache.lengths) < 2:
            raise SpeedError("this bundle computes a single row apart, so its caches need two rows; make them "
                             "with OnnxStageModel.new_cache")
        pair = slice(row, row + 2) if row + 1 < len(cache.lengths) else slice(row - 1, row + 1)
        out = self.run_stage(stage, np.concatenate([hidden, hidden]), cache, pair)  # (2, 1, d)
        return out[row - pair.start : row - pair.start + 1]

    def classify(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hidden (N, d) -> logits (N, V), greedy tokens (N,)."""
        return self._classify(self._head, hidden)

    def classify_guesses(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hidden (N, d) -> logits (N, K) over guess_vocabulary (all V tokens when it is None), greedy
        indices into it (N,)."""
        return self._classify(self._guess_head, hidden)

    def _classify(self, head, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._never_one_row and len(hidden) == 1:
            logits, tokens = head.run(None, {"hidden": np.concatenate([hidden, hidden])})
            return logits[:1], tokens[:1]
        logits, tokens = head.run(None, {"hidden": hidden})
        return logits, tokens
