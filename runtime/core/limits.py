"""What one request may ask of a model, and the cache it needs: shared by every way of decoding."""

from __future__ import annotations

from runtime.core.config import ModelConfig
from runtime.core.errors import SpeedError


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
