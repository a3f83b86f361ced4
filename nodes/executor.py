"""Run a bundle's graphs with ONNX Runtime: embedding lookup, stages and the shared classifier."""

from __future__ import annotations

import numpy as np

from nodes.kv_cache import StageCache
from nodes.onnx_session import create_session
from runtime.bundle import Bundle


class OnnxStageModel:
    """One session per distinct stage graph: stages that share weights share a session."""

    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int = 0):
        self.config = bundle.config
        sessions = {path: create_session(path, device=device, threads=threads) for path in set(bundle.stage_graphs)}
        self._stage_sessions = [sessions[path] for path in bundle.stage_graphs]
        self._head = create_session(bundle.head_graph, device=device, threads=threads)
        self.provider = self._head.get_providers()[0]
        self._embedding = bundle.embedding()
        L = self.config.n_distinct_layers
        self._outputs = ["hidden_out"] + [f"new_key_{l}" for l in range(L)] + [f"new_value_{l}" for l in range(L)]

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """(B, T) int64 -> (B, T, d) float32."""
        return self._embedding[token_ids]

    def run_stage(self, stage: int, hidden: np.ndarray, cache: StageCache) -> np.ndarray:
        """hidden (1, T, d) of the tokens after cache.length -> (1, T, d); appends their K/V."""
        out = self._stage_sessions[stage].run(self._outputs, {"hidden": hidden, **cache.feeds()})
        L = self.config.n_distinct_layers
        cache.append(out[1 : 1 + L], out[1 + L :])
        return out[0]

    def classify(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hidden (N, d) -> logits (N, V), greedy tokens (N,)."""
        logits, tokens = self._head.run(None, {"hidden": hidden})
        return logits, tokens
