"""Run a bundle's graphs with ONNX Runtime: embedding lookup, stages and the shared classifier."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nodes.kv_cache import KVCache
from nodes.onnx_session import create_session
from nodes.stage_model import StageOutput
from runtime.core.bundle import Bundle


class OnnxStageModel:
    """One session per distinct stage graph: stages that share weights share a session. Only the graphs
    of `stages` are loaded (default all), so a node holds in memory just what it may run."""

    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int = 0, stages: Iterable[int] | None = None):
        self.config = bundle.config
        self._graph_ids = bundle.graph_ids
        def session(path: Path):
            return create_session(path, device=device, threads=threads, sha256=bundle.file_sha256(path))

        graphs = bundle.stage_graphs
        self.stages = frozenset(range(len(graphs)) if stages is None else stages)  # the stages it can run
        sessions = {path: session(path) for path in {graphs[stage] for stage in self.stages}}
        self._stage_sessions = {stage: sessions[graphs[stage]] for stage in self.stages}
        self._head = session(bundle.head_graph)
        self.provider = self._head.get_providers()[0]
        self._embedding = bundle.embedding()
        self.exit_adapters = bundle.exit_adapters()
        self._layers = [len(self.config.stage_layers(s)) for s in range(self.config.n_stages)]
        self._outputs = [["hidden_out", *(f"new_key_{l}" for l in range(L)), *(f"new_value_{l}" for l in range(L))]
                         for L in self._layers]

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
        out = self._stage_sessions[stage].run(self._outputs[stage], {"hidden": hidden, **cache.feeds(rows, L)})
        return StageOutput(out[0], out[1 : 1 + L], out[1 + L :])

    def classify(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hidden (N, d) -> logits (N, V), greedy tokens (N,)."""
        logits, tokens = self._head.run(None, {"hidden": hidden})
        return logits, tokens
