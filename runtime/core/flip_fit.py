"""The synthetic guesses' draws (runtime/core/synthetic_guesses.py) that make a data path count the flip rates
the coordinator saw. Pure.

A rate counted at a boundary is not the share of guesses that go wrong there: it also counts the checks of
positions run again after a correction, and of guesses made from contexts that already held a wrong token,
and on the ring only what passed the checks before. How often a check finds a wrong guess also depends on the
timing (a commit that overtakes a correction spares its check), so the draws are searched for on the
placement that counted the rates, with its nodes' timings (placement_search.fit_guesses), else on a
cluster of one node per stage, alike: a coordinate search moves each boundary's share until what the data
path counts is closest to what was seen. Rates read from a bundle are taken as counted too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from runtime.core.lockstep_timing import LockstepTiming
from runtime.core.ring_timing import NodeTiming, RingTiming

FIT_TOKENS = 256  # decoded per trial: counts of a few hundred checks a boundary
FIRST_STEP, LAST_STEP = 0.25, 0.01
MAX_TRIALS = 80
_NODE = NodeTiming({(stage, rows): 1.0 + 0.1 * (rows - 1) for stage in range(64) for rows in (1, 2, 4)}, 0.1)


@lru_cache(maxsize=64)
def knows_better(flips: tuple[float, ...], *, data_path: str, window: int, thresholds: tuple[float, ...],
                 prefill_chunk: int) -> tuple[float, ...]:
    """Per boundary, the share drawn (Guesses.knows_better) whose decode on a cluster of one node per stage,
    alike, counts rates closest to `flips`: for where no placement of the cluster counted them."""
    if not flips or (data_path == "ring" and window == 0):
        return flips  # nothing is guessed, so nothing is counted
    return search_shares(flips, lambda shares: counted_rates(shares, data_path, window, thresholds, prefill_chunk))


def search_shares(flips: tuple[float, ...], count: Callable[[tuple[float, ...]], tuple[float | None, ...]]
                  ) -> tuple[float, ...]:
    """The shares whose decode counts (`count`) rates closest to `flips`: a coordinate search from `flips`."""
    def error(shares: tuple[float, ...]) -> float:
        return sum((seen - got) ** 2 for seen, got in zip(flips, count(shares)) if got is not None)

    best, least, step, trials = flips, error(flips), FIRST_STEP, 1
    while step >= LAST_STEP and trials < MAX_TRIALS:
        moved = False
        for boundary in range(len(flips)):
            for delta in (step, -step):
                share = min(1.0, max(0.0, best[boundary] + delta))
                trial = best[:boundary] + (share,) + best[boundary + 1:]
                trials += 1
                if trial != best and (wrong := error(trial)) < least:
                    best, least, moved = trial, wrong, True
                    break
        if not moved:
            step /= 2
    return best


def counted_rates(shares: tuple[float, ...], data_path: str, window: int, thresholds: tuple[float, ...],
                  prefill_chunk: int) -> tuple[float | None, ...]:
    """What the data path counts at each boundary when the guesses are drawn with `shares`."""
    n_stages = len(shares) + 1
    placement = {stage: f"node-{stage}" for stage in range(n_stages)}
    timings = {name: _NODE for name in placement.values()}
    if data_path == "lockstep":
        timing = LockstepTiming(placement, timings, lambda node: 0.4, shares, True, thresholds,
                                prefill_chunk=prefill_chunk)
    else:
        timing = RingTiming(placement, timings, lambda src, dst: 0.2, shares, window, thresholds,
                            prefill_chunk=prefill_chunk)
    timing.decode(16, FIT_TOKENS)
    return timing.counted_flip_rates()
