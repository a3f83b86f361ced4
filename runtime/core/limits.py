"""What one request may ask of a model, and the cache it needs: shared by every way of decoding."""

from __future__ import annotations

from runtime.core.config import ModelConfig
from runtime.core.errors import SpeedError

MAX_TEMPERATURE = 100.0  # sampling temperature; 0 decodes greedily
MAX_NEW_TOKENS = 2**31 - 1  # the wire's int32; the model's context ends an answer far sooner
MAX_TOP_K = 2**31 - 1  # the wire's int32; more than the vocabulary keeps every token
MAX_STOP_STRINGS = 16  # per request
MAX_STOP_CHARS = 256  # per stop string: each is looked for in the decoded tail at every token


def max_prompt_chars(cfg: ModelConfig) -> int:
    """Characters a prompt may have before it is tokenized: more than 16 per position of the context (at
    least 64 KiB) cannot fit it, so a hostile prompt is refused before it costs a tokenizer's time."""
    return max(64 * 1024, 16 * cfg.context_length)


def check_request(prompt_ids: list[int], cfg: ModelConfig, max_new_tokens: int) -> None:
    if not prompt_ids:
        raise SpeedError("the prompt is empty; give some text for the model to continue")
    if len(prompt_ids) >= cfg.context_length:
        raise SpeedError(f"the prompt has {len(prompt_ids)} tokens but the model's context holds {cfg.context_length}; "
                         f"shorten it to at most {cfg.context_length - 1} tokens")
    if max_new_tokens < 1:
        raise SpeedError(f"max new tokens must be at least 1, got {max_new_tokens}")


def cache_capacity(cfg: ModelConfig, prompt_tokens: int, max_new_tokens: int) -> int:
    """KV-cache positions a request can fill: its prompt and answer, at most the model's context."""
    return min(cfg.context_length, prompt_tokens + max_new_tokens)
