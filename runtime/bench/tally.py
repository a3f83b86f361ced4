"""What the speculative runs of a benchmark mode add up to: median speed and, per committed token,
ticks (lockstep and one process; None on the ring, which has none), stage passes thrown away and guesses
the confidence gate held back."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np

from runtime.core.generation import SpeculationStats


@dataclass
class ModeTally:
    rates: list[float] = field(default_factory=list)  # tokens/s of each run
    runs: int = 0
    ticks: int = 0
    committed: int = 0
    flushed_steps: int = 0
    held_guesses: int = 0
    flips: np.ndarray | None = None  # summed flip rates per boundary

    def add(self, tokens_per_s: float, stats: SpeculationStats | None = None) -> None:
        self.rates.append(tokens_per_s)
        if stats is None:
            return
        self.runs += 1
        self.ticks += stats.ticks
        self.committed += stats.committed
        self.flushed_steps += stats.flushed_steps
        self.held_guesses += stats.held_guesses
        flips = np.asarray(stats.flips_per_boundary, dtype=np.float64)
        self.flips = flips if self.flips is None else self.flips + flips

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def speculation(self) -> dict:
        """Flips per boundary (mean over runs) and, per committed token, ticks, wasted stage passes and
        guesses held back."""
        committed = max(self.committed, 1)
        return {"flips_per_boundary": [round(float(p), 4) for p in self.flips / max(self.runs, 1)],
                # the ring has no ticks: nothing measured, nothing reported
                "ticks_per_token": round(self.ticks / committed, 3) if self.ticks else None,
                "wasted_passes_per_token": round(self.flushed_steps / committed, 3),
                "held_guesses_per_token": round(self.held_guesses / committed, 3)}


def describe_speculation(figures: dict) -> str:
    flips = "  ".join(f"{p:.1%}" for p in figures["flips_per_boundary"])
    ticks = f"{figures['ticks_per_token']} ticks, " if figures["ticks_per_token"] else ""  # the ring has no ticks
    return (f"flips per boundary {flips}; per token {ticks}{figures['wasted_passes_per_token']} wasted passes, "
            f"{figures['held_guesses_per_token']} guesses held")
