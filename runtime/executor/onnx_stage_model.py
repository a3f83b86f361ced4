"""Run a bundle's graphs with ONNX Runtime: embedding lookup, stages and the shared classifier."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from runtime.core.bundle import Bundle
from runtime.executor.kv_cache import KVCache
from runtime.executor.onnx_session import create_session
from runtime.executor.stage_model import StageOutput


def stage_outputs(layers: int) -> list[str]:
    return ["hidden_out", *(f"new_key_{l}" for l in range(layers)), *(f"new_value_{l}" for l in range(layers))]


class OnnxStageModel:
    """One session per distinct stage graph: stages that share weights share a session. Only the graphs
    of `stages` are loaded (default all), so a node holds in memory just what it may run."""

    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int = 0, stages: Iterable[int] | None = None):
        self.config = bundle.config
        self._graph_ids = bundle.graph_ids
        # where a single row is computed with another kernel (Bundle.one_row_computed_apart), the graphs
        # always get at least two rows, so a token's result never depends on what it is batched with, which
        # lossless speculation needs
        self._never_one_row = bundle.one_row_computed_apart

        def session(path: Path):
            return create_session(path, device=device, threads=threads, sha256=bundle.file_sha256(path))

        graphs = bundle.stage_graphs
        self.stages = frozenset(range(len(graphs)) if stages is None else stages)  # the stages it can run
        sessions = {path: session(path) for path in {graphs[stage] for stage in self.stages}}
        self._stage_sessions = {stage: sessions[graphs[stage]] for stage in self.stages}
        self._head = session(bundle.head_graph)
        self.provider = self._head.get_providers()[0]
        guess_head = bundle.guess_head_graph
        self._guess_head = session(guess_head) if guess_head is not None else self._head
        self.guess_vocabulary = bundle.guess_vocabulary()
        self._embedding = bundle.embedding()
        self.exit_maps = bundle.exit_maps()
        self._exit_sessions = {stage: session(path) for stage, path in bundle.exit_layer_graphs().items()
                               if stage in self.stages}
        self.exit_layer_stages = frozenset(self._exit_sessions)
        self._layers = [len(self.config.stage_layers(s)) for s in range(self.config.n_stages)]
        self._outputs = [stage_outputs(L) for L in self._layers]

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """(B, T) int64 -> (B, T, d) float32."""
        return self._embedding[token_ids]

    def graph_of(self, stage: int) -> int:
        """Stages with the same graph id share weights and can run in one call."""
        return self._graph_ids[stage]

    def run_stage(self, stage: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> StageOutput:
        """hidden (B, T, d) of the tokens after each row's cache length, B = rows of `rows`.
        Returns hidden (B, T, d) and per layer new keys (B, Hkv, hd, T) and values (B, Hkv, T, hd)."""
        L = self._layers[stage]
        if self._never_one_row and hidden.shape[:2] == (1, 1):
            if len(cache.lengths) > 1:
                return self._run_beside_a_neighbour(stage, hidden, cache, rows.start)
            feeds = {name: np.concatenate([array, array]) for name, array in cache.feeds(rows, L).items()}
            out = self._stage_sessions[stage].run(self._outputs[stage], {"hidden": np.concatenate([hidden, hidden]),
                                                                         **feeds})  # a cache of one row: twice
            return StageOutput(out[0][:1], [k[:1] for k in out[1 : 1 + L]], [v[:1] for v in out[1 + L :]])
        out = self._stage_sessions[stage].run(self._outputs[stage], {"hidden": hidden, **cache.feeds(rows, L)})
        return StageOutput(out[0], out[1 : 1 + L], out[1 + L :])

    def run_exit_layer(self, stage: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> StageOutput:
        """The stage's one-layer exit: a stage graph of one layer over its own cache (one layer per row)."""
        hidden_out, key, value = self._exit_sessions[stage].run(stage_outputs(1), {"hidden": hidden, **cache.feeds(rows, 1)})
        return StageOutput(hidden_out, [key], [value])

    def _run_beside_a_neighbour(self, stage: int, hidden: np.ndarray, cache: KVCache, row: int) -> StageOutput:
        """Run one token as one of two rows, the other a neighbouring cache row whose result is dropped
        (rows are independent in every op, and the neighbour is a view: nothing is copied)."""
        pair = slice(row, row + 2) if row + 1 < len(cache.lengths) else slice(row - 1, row + 1)
        out = self.run_stage(stage, np.concatenate([hidden, hidden]), cache, pair)  # (2, 1, d)
        keep = slice(row - pair.start, row - pair.start + 1)
        return StageOutput(out.hidden[keep], [k[keep] for k in out.new_keys], [v[keep] for v in out.new_values])

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
