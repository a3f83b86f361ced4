"""Plain decoding in one process: the output every other mode must reproduce exactly.

Each new token runs through every stage in order (no speculation); every stage appends to its own
row of a KV cache preallocated for the whole request, so a step copies only the new entries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from runtime.core.generation import SpeculationStats, steady_rate
from runtime.core.grouping import PREFILL_CHUNK
from runtime.core.limits import cache_capacity, check_request
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.core.stopping import StopReason
from runtime.executor.draws import classify_rows
from runtime.executor.kept_states import FROM_TOKEN
from runtime.executor.kv_cache import KVCache
from runtime.executor.stage_model import KeptRows, StageModel


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # generated tokens only; EOS is not included
    stop_reason: StopReason
    prompt_tokens: int
    first_token_s: float  # prompt prefill plus the first token
    decode_s: float  # every token after the first
    stats: SpeculationStats | None = None  # speculative decoding's counters, when it was used

    @property
    def tokens_per_s(self) -> float:
        return steady_rate(len(self.token_ids), self.decode_s)


def generate_plain(model: StageModel, prompt_ids: list[int], *, max_new_tokens: int, eos_id: int,
                   sampling: SamplingParams = GREEDY, should_stop: Callable[[list[int]], bool] | None = None,
                   prefill_chunk: int = PREFILL_CHUNK) -> Generation:
    """Tokens after the prompt (run in passes of prefill_chunk positions), one full pass of every stage per
    token; an eos_id of -1 never stops."""
    cfg = model.config
    check_request(prompt_ids, cfg, max_new_tokens)
    capacity = cache_capacity(cfg, len(prompt_ids), max_new_tokens)
    cache = model.new_cache(rows=cfg.n_stages, capacity=capacity)

    started = time.perf_counter()
    for start in range(0, len(prompt_ids), prefill_chunk):
        hidden = _run_stages(model, np.asarray([prompt_ids[start : start + prefill_chunk]], dtype=np.int64), cache)
    token = _choose(model, hidden, cache, sampling)
    first_token_at = time.perf_counter()
    generated: list[int] = []
    while True:
        if token == eos_id:
            stop = StopReason.EOS
            break
        generated.append(token)
        if should_stop is not None and should_stop(generated):
            stop = StopReason.STOP
            break
        if len(generated) == max_new_tokens:
            stop = StopReason.LENGTH
            break
        if cache.lengths[0] == capacity:
            stop = StopReason.CONTEXT
            break
        token = _choose(model, _run_stages(model, np.asarray([[token]], dtype=np.int64), cache), cache, sampling)
    return Generation(generated, stop, len(prompt_ids), first_token_at - started, time.perf_counter() - first_token_at)


def _run_stages(model: StageModel, token_ids: np.ndarray, cache: KVCache) -> np.ndarray | KeptRows:
    """Run tokens (1, T) through every stage (row s of the cache is stage s): the last stage's hidden states, (1, T, d)
    or, for one token on a model that keeps them on its device, there."""
    count = token_ids.shape[1]
    if model.keeps_states and count == 1:  # the first stage looks the token up, each next reads the state before it
        for stage in range(model.config.n_stages):
            model.run_kept(stage, cache, slice(stage, stage + 1), np.array([stage - 1 if stage else FROM_TOKEN]),
                           token_ids[0], None)
            cache.advance(stage, count)
        return KeptRows(cache, (model.config.n_stages - 1,))
    hidden = model.embed(token_ids)
    for stage in range(model.config.n_stages):
        hidden = model.run_stage(stage, hidden, cache, slice(stage, stage + 1))
        cache.advance(stage, count)
    return hidden


def _choose(model: StageModel, hidden: np.ndarray | KeptRows, cache: KVCache, sampling: SamplingParams) -> int:
    """The next token after the last position run."""
    last = hidden if isinstance(hidden, KeptRows) else hidden[0, -1:]
    [(token, _)] = classify_rows(model, last, [sampling], [int(cache.lengths[0])], np.zeros(1, dtype=bool))
    return token
