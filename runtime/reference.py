"""Plain decoding in one process: the output every other mode must reproduce exactly.

Each new token runs through every stage in order (no speculation); every stage appends to its own
row of a KV cache preallocated for the whole request, so a step copies only the new entries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nodes.executor import StageModel
from nodes.kv_cache import KVCache
from runtime.bundle import Bundle, load_bundle
from runtime.config import ModelConfig
from runtime.errors import SpeedError
from runtime.sampling import GREEDY, SamplingParams, choose_token
from runtime.stopping import StopStrings

BACKENDS = ("onnx", "torch")


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # generated tokens only; EOS is not included
    stop_reason: str  # "eos", "length" (max new tokens), "stop" (a stop string) or "context" (context full)
    prompt_tokens: int
    first_token_s: float  # prompt prefill plus the first token
    decode_s: float  # every token after the first
    stats: dict = field(default_factory=dict)  # speculative decoding's counters, when it was used

    @property
    def tokens_per_s(self) -> float:
        return decode_rate(len(self.token_ids), self.decode_s)


def decode_rate(tokens: int, decode_s: float) -> float:
    """Steady decoding rate: tokens after the first over the time they took."""
    return (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else 0.0


def open_stage_model(bundle: Bundle, *, backend: str = "onnx", device: str = "cpu", threads: int = 1) -> StageModel:
    """threads: intra-op threads, 0 = one per core; 1 (default) was fastest for decoding on 2 cores."""
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


def check_request(prompt_ids: list[int], cfg: ModelConfig, max_new_tokens: int) -> None:
    if not prompt_ids:
        raise SpeedError("the prompt is empty; give some text for the model to continue")
    if len(prompt_ids) >= cfg.context_length:
        raise SpeedError(f"the prompt has {len(prompt_ids)} tokens but the model's context holds {cfg.context_length}; "
                         f"shorten it to at most {cfg.context_length - 1} tokens")
    if max_new_tokens < 1:
        raise SpeedError(f"max new tokens must be at least 1, got {max_new_tokens}")


def cache_capacity(cfg: ModelConfig, prompt_tokens: int, max_new_tokens: int) -> int:
    return min(cfg.context_length, prompt_tokens + max_new_tokens)


def generate_plain(model: StageModel, prompt_ids: list[int], *, max_new_tokens: int, eos_id: int,
                   sampling: SamplingParams = GREEDY,
                   should_stop: Callable[[list[int]], bool] | None = None) -> Generation:
    """Tokens after the prompt, one full pass of every stage per token; an eos_id of -1 never stops."""
    cfg = model.config
    check_request(prompt_ids, cfg, max_new_tokens)
    capacity = cache_capacity(cfg, len(prompt_ids), max_new_tokens)
    cache = KVCache(cfg, rows=cfg.n_stages, capacity=capacity)

    started = time.perf_counter()
    token = _next_token(model, np.asarray([prompt_ids], dtype=np.int64), cache, sampling)
    first_token_at = time.perf_counter()
    generated: list[int] = []
    while True:
        if token == eos_id:
            stop = "eos"
            break
        generated.append(token)
        if should_stop is not None and should_stop(generated):
            stop = "stop"
            break
        if len(generated) == max_new_tokens:
            stop = "length"
            break
        if cache.lengths[0] == capacity:
            stop = "context"
            break
        token = _next_token(model, np.asarray([[token]], dtype=np.int64), cache, sampling)
    return Generation(generated, stop, len(prompt_ids), first_token_at - started, time.perf_counter() - first_token_at)


def _next_token(model: StageModel, token_ids: np.ndarray, cache: KVCache, sampling: SamplingParams) -> int:
    """Run tokens (1, T) through every stage (row s of the cache is stage s); choose the next token."""
    hidden = model.embed(token_ids)
    count = token_ids.shape[1]
    for stage in range(model.config.n_stages):
        out = model.run_stage(stage, hidden, cache, slice(stage, stage + 1))
        cache.append(stage, [k[0] for k in out.new_keys], [v[0] for v in out.new_values], count)
        hidden = out.hidden
    logits, _ = model.classify(hidden[0, -1:])
    return choose_token(logits[0], sampling, position=int(cache.lengths[0]))


@dataclass(frozen=True)
class ReferenceResult:
    text: str
    generation: Generation
    backend: str
    provider: str

    def to_json(self) -> dict:
        g = self.generation
        out = {
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
        if g.stats:
            out["stats"] = g.stats
        return out


def run_reference(prompt: str, *, bundle_path: Path | None, backend: str, max_new_tokens: int,
                  sampling: SamplingParams = GREEDY, speculate: bool = False, stop: list[str] | None = None,
                  device: str = "cpu", threads: int = 1, chat: bool = False,
                  plain_guesses: bool = False) -> ReferenceResult:
    """Validate everything cheap first, so bad input fails before any model is loaded."""
    if not prompt:
        raise SpeedError("the prompt is empty; give some text for the model to continue")
    if max_new_tokens < 1:
        raise SpeedError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    bundle = load_bundle(bundle_path)
    tokenizer = bundle.tokenizer()
    prompt_ids = tokenizer.encode(bundle.prompt_text(prompt, chat=chat)).ids
    check_request(prompt_ids, bundle.config, max_new_tokens)
    model = open_stage_model(bundle, backend=backend, device=device, threads=threads)
    stop_strings = StopStrings(tokenizer, stop or [])
    options = {"max_new_tokens": max_new_tokens, "eos_id": bundle.eos_token_id, "sampling": sampling,
               "should_stop": stop_strings or None}
    if speculate:
        from runtime.speculative import generate_speculative

        (generation,) = generate_speculative(model, [prompt_ids], plain_guesses=plain_guesses, **options)
    else:
        generation = generate_plain(model, prompt_ids, **options)
    text = stop_strings.cut(tokenizer.decode(generation.token_ids))
    return ReferenceResult(text, generation, backend, model.provider)
