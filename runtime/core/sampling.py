"""Lossless sampling: the token at a position is drawn with random numbers that depend only on
(seed, position), so sequential and speculative decoding draw the same token from the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.core.errors import SpeedError
from runtime.core.limits import MAX_TOP_K


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p
    seed: int = 0  # with the position, fixes the random draw

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SpeedError(f"seed must be an integer, got {self.seed!r}")
        if not self.temperature >= 0:
            raise SpeedError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            raise SpeedError(f"top-k must be a whole number from 0 (off) to {MAX_TOP_K}, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise SpeedError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def gumbel_noise(seed: int, position: int, size: int) -> np.ndarray:
    """The random numbers used for the token at `position`: a pure function of (seed, position)."""
    return np.random.default_rng([seed & (2**63 - 1), position]).gumbel(size=size)


def choose_token(logits: np.ndarray, params: SamplingParams, position: int, *, token_ids: np.ndarray | None = None,
                 vocab_size: int | None = None) -> int:
    """logits (V,) -> the token for `position`: argmax when greedy, else a draw from the filtered
    distribution by the Gumbel-max trick (argmax of scaled logits plus per-token noise). The noise depends
    only on (seed, position), so two close distributions drawn at one position usually give one token:
    a speculative guess drawn from an early stage agrees with the last stage's draw that often.
    token_ids (K,) of a vocabulary of vocab_size: logits (K,) score only these tokens (a guess head's),
    each with the noise it has in the full draw; the index into token_ids is returned."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    keep = np.ones(scaled.shape, dtype=bool)
    if params.top_k and params.top_k < scaled.size:
        keep &= scaled >= np.partition(scaled, -params.top_k)[-params.top_k]
    if params.top_p < 1:
        probs = np.where(keep, np.exp(scaled - scaled[keep].max()), 0.0)
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[mass_before < params.top_p]] = True
        keep &= nucleus
    noise = gumbel_noise(params.seed, position, vocab_size or scaled.size)
    perturbed = np.where(keep, scaled + (noise if token_ids is None else noise[token_ids]), -np.inf)
    return int(np.argmax(perturbed))
