"""The torch model rebuilt from a bundle's own weights, to check the ONNX graphs against."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from runtime.core.bundle import Bundle
from runtime.core.errors import SpeedError
from runtime.executor.kv_cache import KVCache
from runtime.executor.stage_model import top_probabilities
from runtime.models.decoder import SpeedDecoder

PARAMETER_PREFIX = "model."  # the export wraps the decoder as `model`


def model_from_bundle(bundle: Bundle) -> SpeedDecoder:
    """Load the stage and head initializers, which carry the torch parameter names (the other constants the
    export names after the layer that reads them, such as the rotary tables, are not parameters)."""
    if bundle.quantized:
        raise SpeedError(f"bundle {bundle.path} is quantized, and exits are trained and models fine-tuned on float32 "
                         "weights; give the float32 bundle it was made from (`speed import gguf --weights f32`)")
    model = SpeedDecoder(bundle.config)
    parameters = model.state_dict().keys()
    state = {"embedding.weight": torch.from_numpy(np.array(bundle.embedding()))}
    for path in (*sorted(set(bundle.stage_graphs)), bundle.head_graph):
        graph = onnx.load(str(path), load_external_data=False).graph
        for tensor in graph.initializer:
            name = tensor.name.removeprefix(PARAMETER_PREFIX)
            if name in parameters and tensor.data_location != onnx.TensorProto.EXTERNAL:
                state[name] = torch.from_numpy(numpy_helper.to_array(tensor).copy())
    model.load_state_dict(state)
    return model.eval()


class TorchStageModel:
    """The same interface as runtime.executor.onnx_stage_model.OnnxStageModel, computed by torch eager."""

    provider = "torch-cpu"
    keeps_logits = False  # they are on the host: a draw reads them all
    keeps_states = False  # hidden states too

    def __init__(self, bundle: Bundle, *, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.config = bundle.config
        self._graph_ids = bundle.graph_ids
        self.model = model_from_bundle(bundle)
        self.exit_maps = bundle.exit_maps()
        self.exit_layer_stages: frozenset[int] = frozenset()  # one-layer exits run on ONNX Runtime only
        self.guess_vocabulary = None  # guesses score every token, as the parity checks compare the full head

    @torch.no_grad()
    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        return self.model.embedding(torch.from_numpy(token_ids)).numpy()

    def graph_of(self, stage: int) -> int:
        return self._graph_ids[stage]

    def new_cache(self, *, rows: int, capacity: int, layers: int | None = None) -> KVCache:
        return KVCache(self.config, rows=rows, capacity=capacity, layers=layers)

    @torch.no_grad()
    def run_stage(self, stage: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray:
        L = len(self.config.stage_layers(stage))
        feeds = cache.feeds(rows, L)
        hidden_out, new_keys, new_values = self.model.stage_step(
            torch.from_numpy(hidden),
            torch.from_numpy(np.ascontiguousarray(feeds["cache_length"])),
            [torch.from_numpy(feeds[f"cache_key_{l}"]) for l in range(L)],
            [torch.from_numpy(feeds[f"cache_value_{l}"]) for l in range(L)],
            stage,
        )
        cache.write(rows, [k.numpy() for k in new_keys], [v.numpy() for v in new_values])
        return hidden_out.numpy()

    @torch.no_grad()
    def classify(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = self.model.classify(torch.from_numpy(hidden))
        return logits.numpy(), logits.argmax(-1).numpy()

    def classify_guesses(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.classify(hidden)

    def classify_greedy(self, hidden: np.ndarray, scored: np.ndarray, *, guesses: bool = False
                        ) -> tuple[np.ndarray, np.ndarray]:
        logits, tokens = self.classify(hidden)
        return tokens, top_probabilities(logits, scored)
