"""Speculative pipelined decoding in one process: the SPEED core driving the local tick executor."""

from __future__ import annotations

import time
from collections.abc import Callable

from runtime.core.generation import SpeculationStats
from runtime.core.grouping import PREFILL_CHUNK
from runtime.core.limits import cache_capacity, check_request
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.core.scheduler import SpeedScheduler
from runtime.executor.stage_model import StageModel
from runtime.executor.tick_executor import TickExecutor
from runtime.local.plain import Generation


def generate_speculative(model: StageModel, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int,
                         sampling: SamplingParams = GREEDY, speculate: bool = True, prefill_chunk: int = PREFILL_CHUNK,
                         should_stop: Callable[[list[int]], bool] | None = None,
                         plain_guesses: bool = False, guess_thresholds: tuple[float, ...] = ()) -> list[Generation]:
    """Decode several prompts together, their items sharing ticks; one Generation per prompt.
    plain_guesses: guess through the plain head even when the model has exits (same text).
    guess_thresholds: per early stage, the probability a guess needs to be sent (the gate; same text)."""
    cfg = model.config
    for prompt in prompts:
        check_request(prompt, cfg, max_new_tokens)
    capacity = max(cache_capacity(cfg, len(p), max_new_tokens) for p in prompts)
    executor = TickExecutor(model, slots=len(prompts), capacity=capacity)
    scheduler = SpeedScheduler(cfg.n_stages, prefill_chunk=prefill_chunk)
    for seq_id, prompt in enumerate(prompts):
        executor.open(seq_id, sampling, plain_guesses=plain_guesses)
        scheduler.add(seq_id, prompt, max_new_tokens=max_new_tokens, context_length=cfg.context_length,
                      speculate=speculate, guess_thresholds=guess_thresholds, eos_id=eos_id, should_stop=should_stop)

    started = time.perf_counter()
    first_token_at: dict[int, float] = {}
    finished_at: dict[int, float] = {}
    while scheduler.active:
        result = executor.run(scheduler.plan())
        scheduler.apply(result.predictions, result.confidence)
        now = time.perf_counter()
        for seq_id, seq in scheduler.sequences.items():
            if seq_id not in first_token_at and (seq.generated or seq.done):
                first_token_at[seq_id] = now
            if seq_id not in finished_at and seq.done:
                finished_at[seq_id] = now

    generations = []
    for seq_id, seq in scheduler.sequences.items():
        generations.append(Generation(
            token_ids=seq.generated, stop_reason=seq.stop_reason, prompt_tokens=len(seq.prompt),
            first_token_s=first_token_at[seq_id] - started, decode_s=finished_at[seq_id] - first_token_at[seq_id],
            stats=SpeculationStats.of(seq),
        ))
    return generations
