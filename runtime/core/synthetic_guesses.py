"""The synthetic model the timing models decode with: a fixed token sequence, and early stages whose guesses
go wrong at the rates the coordinator counts. Pure.

How a rate is counted decides what it means. A stage checks the token a position arrives with (an earlier
stage's guess) against its own prediction; the coordinator's flip rate at a boundary is the share of those
checks that differed. Early exits are wrong together: where stage 0 guesses wrong, the stages after it tend
to predict the same wrong token until one of them knows better (an imported model's early exits read much
the same hidden state). So each guessed position draws the first stage that knows better, and every stage
before it repeats stage 0's wrong token. From a context that already holds a wrong token the stages
disagree: each predicts a wrong token of its own. (SmolLM2's rates counted on three nodes, 0.56 and 0.77,
can only be made so: with those predictions alike, the closest the simulated ring counted was 0.32 and
0.59; with them apart, 0.50 and 0.75.) What a data path counts also holds the checks of positions run again after a
correction and of guesses from wrong contexts, so the shares drawn are fitted to make the data path count
the rates seen (runtime/core/flip_fit.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

VOCAB = 1 << 16


def true_token(position: int) -> int:
    return (position * 7919 + 13) % VOCAB


@dataclass(frozen=True)
class Guesses:
    """knows_better[b]: of the guessed positions whose stages 0..b agree, the share where stage b + 1 knows better
    (it predicts the right token; the last stage always does)."""

    knows_better: tuple[float, ...]
    seed: int = 0

    def prediction(self, stage: int, position: int, generation: int = 0, *, right_context: bool = True) -> int:
        """What `stage` predicts for `position`. From a right context the last stage is always right; from one that
        holds a wrong token each stage predicts a wrong token of its own."""
        if not right_context:
            return (true_token(position) + 2 + stage) % VOCAB
        first = self._first_to_know_better(position, generation)
        return true_token(position) if first is None or stage >= first else (true_token(position) + 1) % VOCAB

    def _first_to_know_better(self, position: int, generation: int) -> int | None:
        draw = random.Random(hash((self.seed, position, generation)))
        for boundary, share in enumerate(self.knows_better):
            if draw.random() < share:
                return boundary + 1
        return None  # stage 0 guessed right
