"""A classifier call and each row's token: its greedy token or its draw (runtime.core.sampling), with the token's
probability where the confidence gate asks for it.

Where the model keeps its logits where it computed them (a GPU's), only what the tokens need crosses to the host:
greedy tokens and their probabilities, or each drawn row's largest logits, which decide its draw exactly
(choose_from_top); every logit only where they cannot.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from runtime.core.sampling import SamplingParams, choose_from_top, choose_token
from runtime.executor.stage_model import KeptRows, StageModel

# the largest logits fetched for a draw without top_k. Of 144 positions of three sampled SmolLM2 answers, 1024
# decided 99% of the draws at temperature 0.7 and 72% at 1 (256: 86% and 46%); a GPU fetches 12 KB a row, not 196
TOP_FOR_TEMPERATURE = 1024


def classify_rows(model: StageModel, hidden: np.ndarray | KeptRows, samplings: list[SamplingParams], positions: list[int],
                  scored: np.ndarray, *, guesses: bool = False, token_ids: np.ndarray | None = None
                  ) -> list[tuple[int, float]]:
    """hidden (N, d) -> each row's token for its position (with guesses: drawn through the guess head, an index into
    token_ids, the tokens it scores, where it has its own), and where `scored` (N,) bool its probability (NaN
    elsewhere). A guess of a sampled sequence is the draw the last stage will make at that position, with the same
    random numbers, from the early distribution: it agrees whenever the two are close."""
    if all(sampling.greedy for sampling in samplings):
        indices, probabilities = model.classify_greedy(hidden, scored, guesses=guesses)
        return [(int(index), float(probability)) for index, probability in zip(indices, probabilities)]
    if model.keeps_logits:
        return _from_top(model, hidden, samplings, positions, scored, guesses, token_ids)
    logits, greedy = (model.classify_guesses if guesses else model.classify)(hidden)
    chosen = []
    for row, (sampling, position) in enumerate(zip(samplings, positions)):
        index = int(greedy[row]) if sampling.greedy else choose_token(
            logits[row], sampling, position, token_ids=token_ids, vocab_size=model.config.vocab_size)
        chosen.append((index, guess_probability(logits[row], index, sampling.temperature) if scored[row] else math.nan))
    return chosen


def guess_probability(logits: np.ndarray, token: int, temperature: float) -> float:
    """The probability a stage gives its guess: the top probability for greedy decoding, the drawn
    token's under the tempered distribution for sampling."""
    scaled = logits * np.float32(1 / (temperature or 1.0))  # (V,) float32: precise enough to gate a guess, and
    shifted = np.exp(scaled - scaled.max())  # on a large vocabulary several times faster than float64
    return float(shifted[token] / shifted.sum())


def _from_top(model: StageModel, hidden: np.ndarray, samplings: list[SamplingParams], positions: list[int],
              scored: np.ndarray, guesses: bool, token_ids: np.ndarray | None) -> list[tuple[int, float]]:
    size = len(token_ids) if token_ids is not None else model.config.vocab_size
    inverse = np.array([1 / (sampling.temperature or 1.0) for sampling in samplings], np.float32)
    top = model.classify_top(hidden, inverse, min(size, max(_top_count(s, size) for s in samplings)), guesses=guesses)
    all_logits = functools.cache(top.fetch_all)  # fetched once for the call, where a row's largest do not decide
    chosen = []
    for row, (sampling, position) in enumerate(zip(samplings, positions)):
        if sampling.greedy:
            index = int(top.greedy[row])
        else:
            index = choose_from_top(top.logits[row], top.tokens[row], top.size, sampling, position,
                                    token_ids=token_ids, vocab_size=model.config.vocab_size)
            if index is None:
                index = choose_token(all_logits()[row], sampling, position, token_ids=token_ids,
                                     vocab_size=model.config.vocab_size)
        probability = math.nan
        if scored[row]:
            among = np.flatnonzero(top.tokens[row] == index)
            logit = top.logits[row][among[0]] if len(among) else all_logits()[row][index]
            probability = float(np.exp((logit - top.logits[row].max()) * inverse[row]) / top.totals[row])
        chosen.append((index, probability))
    return chosen


def _top_count(sampling: SamplingParams, size: int) -> int:
    """How many of a row's largest logits its token needs (one where they cannot decide it: it reads them all)."""
    if sampling.greedy or (sampling.top_p < 1 and not 0 < sampling.top_k < size):
        return 1
    return sampling.top_k + 1 if 0 < sampling.top_k < size else TOP_FOR_TEMPERATURE
