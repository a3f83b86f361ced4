"""Plain greedy decoding in one process: the output every other mode must reproduce exactly.

Each new token runs through every stage in order (no speculation); every stage appends to its
own KV cache, preallocated for the whole request, so a step copies only the new entries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from nodes.kv_cache import StageCache
from runtime.bundle import Bundle, load_bundle
from runtime.config import ModelConfig
from runtime.errors import SpeedError

BACKENDS = ("onnx", "torch")


class StageModel(Protocol):
    config: ModelConfig
    provider: str

    def embed(self, token_ids: np.ndarray) -> np.ndarray: ...  # (B, T) int64 -> (B, T, d)

    def run_stage(self, stage: int, hidden: np.ndarray, cache: StageCache) -> np.ndarray: ...  # (1, T, d)

    def classify(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...  # (N, d) -> logits, tokens


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # generated tokens only; EOS is not included
    stop_reason: str  # "eos", "length" (max new tokens) or "context" (the model's context is full)
    prompt_tokens: int
    first_token_s: float  # prompt prefill plus the first token
    decode_s: float  # every token after the first

    @property
    def tokens_per_s(self) -> float:
        """Steady decoding rate: tokens after the first over the time they took."""
        return (len(self.token_ids) - 1) / self.decode_s if len(self.token_ids) > 1 and self.decode_s > 0 else 0.0


def open_stage_model(bundle: Bundle, *, backend: str = "onnx", device: str = "cpu", threads: int = 0) -> StageModel:
    if backend == "onnx":
        from nodes.executor import OnnxStageModel

        return OnnxStageModel(bundle, device=device, threads=threads)
    if backend == "torch":
        if device != "cpu":
            raise SpeedError("the torch backend runs on cpu only; use --backend onnx for other devices")
        try:
            from runtime.torch_backend import TorchStageModel
        except ImportError:
            hint = "pip install -e '.[train]' -c constraints.txt"
            raise SpeedError(f"the torch backend needs torch and onnx: {hint}") from None
        return TorchStageModel(bundle, threads=threads)
    raise SpeedError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def check_prompt(prompt_ids: list[int], cfg: ModelConfig) -> None:
    if not prompt_ids:
        raise SpeedError("the prompt is empty; give some text for the model to continue")
    if len(prompt_ids) >= cfg.context_length:
        raise SpeedError(f"the prompt has {len(prompt_ids)} tokens but the model's context holds {cfg.context_length}; "
                         f"shorten it to at most {cfg.context_length - 1} tokens")


def generate_greedy(model: StageModel, prompt_ids: list[int], *, max_new_tokens: int, eos_id: int) -> Generation:
    """Greedy tokens after the prompt; an eos_id of -1 never stops (benchmarks)."""
    cfg = model.config
    check_prompt(prompt_ids, cfg)
    if max_new_tokens < 1:
        raise SpeedError(f"max new tokens must be at least 1, got {max_new_tokens}")
    capacity = min(cfg.context_length, len(prompt_ids) + max_new_tokens)
    caches = [StageCache(cfg, capacity) for _ in range(cfg.n_stages)]

    started = time.perf_counter()
    token = _next_token(model, np.asarray([prompt_ids], dtype=np.int64), caches)
    first_token_at = time.perf_counter()
    generated: list[int] = []
    while True:
        if token == eos_id:
            stop = "eos"
            break
        generated.append(token)
        if len(generated) == max_new_tokens:
            stop = "length"
            break
        if caches[0].length == capacity:
            stop = "context"
            break
        token = _next_token(model, np.asarray([[token]], dtype=np.int64), caches)
    return Generation(
        token_ids=generated,
        stop_reason=stop,
        prompt_tokens=len(prompt_ids),
        first_token_s=first_token_at - started,
        decode_s=time.perf_counter() - first_token_at,
    )


def _next_token(model: StageModel, token_ids: np.ndarray, caches: list[StageCache]) -> int:
    """Run tokens (1, T) through every stage and return the greedy prediction after the last."""
    hidden = model.embed(token_ids)
    for stage, cache in enumerate(caches):
        hidden = model.run_stage(stage, hidden, cache)
    _, tokens = model.classify(hidden[0, -1:])
    return int(tokens[0])


@dataclass(frozen=True)
class ReferenceResult:
    text: str
    generation: Generation
    backend: str
    provider: str

    def to_json(self) -> dict:
        g = self.generation
        return {
            "text": self.text,
            "token_ids": g.token_ids,
            "tokens_per_s": round(g.tokens_per_s, 2),
            "prompt_tokens": g.prompt_tokens,
            "new_tokens": len(g.token_ids),
            "stop_reason": g.stop_reason,
            "time_to_first_token_ms": round(g.first_token_s * 1000, 2),
            "backend": self.backend,
            "provider": self.provider,
        }


def run_reference(prompt: str, *, bundle_path: Path | None, backend: str, max_new_tokens: int,
                  device: str = "cpu", threads: int = 0) -> ReferenceResult:
    """Validate everything cheap first, so bad input fails before any model is loaded."""
    if not prompt:
        raise SpeedError("the prompt is empty; give some text for the model to continue")
    if max_new_tokens < 1:
        raise SpeedError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    bundle = load_bundle(bundle_path)
    tokenizer = bundle.tokenizer()
    prompt_ids = tokenizer.encode(prompt).ids
    check_prompt(prompt_ids, bundle.config)
    model = open_stage_model(bundle, backend=backend, device=device, threads=threads)
    generation = generate_greedy(model, prompt_ids, max_new_tokens=max_new_tokens, eos_id=bundle.eos_token_id)
    return ReferenceResult(tokenizer.decode(generation.token_ids), generation, backend, model.provider)
