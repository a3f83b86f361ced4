"""Choosing where stages run from what the nodes measured of themselves: placements scored by the timing
model of the cluster's data path (runtime/core/ring_timing.py, runtime/core/lockstep_timing.py). Pure: the
same inputs give the same ranking.

Candidates are every way to give each stage to a node that can host it while there are at most
MAX_CANDIDATES; beyond, a local search from the starting placement that moves one stage at a time while
a move predicts more tokens/s.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from runtime.core.flip_fit import FIT_TOKENS, knows_better, search_shares
from runtime.core.lockstep_timing import LockstepTiming
from runtime.core.ring_timing import NodeTiming, RingTiming

MAX_CANDIDATES = 4096
PROMPT_TOKENS, NEW_TOKENS = 16, 128  # the request each candidate decodes in the simulation
COORDINATOR = "coordinator"  # its name for link_ms, on the lockstep data path
MOVE_MARGIN = 1.05  # a placement replaces the current one only when predicted this much faster
MAX_COST_MS = 1024.0  # a cost fitted beyond means the model does not describe the cluster
Cost = Literal["run_overhead_ms", "message_ms"]  # the model's costs that fit_cost can find


@dataclass(frozen=True)
class TimingModel:
    """Everything the prediction needs apart from the placement."""

    timings: Mapping[str, NodeTiming]  # per node: its measured pass and classifier times
    link_ms: Callable[[str, str], float]  # one-way latency from one node to another ("coordinator" included)
    flips: tuple[float, ...]  # per stage boundary: the share of checks found wrong, as the data path counts them
    thresholds: tuple[float, ...]  # per early stage: the confidence gate
    speculate: bool
    window: int  # the ring: positions stage 0 runs ahead when speculating
    prefill_chunk: int
    data_path: str = "ring"  # or "lockstep"
    run_overhead_ms: float = 0.0  # what a run costs beside its pass (fit_cost finds it from a measurement)
    guess_draws: tuple[float, ...] | None = None  # fit_guesses finds them on the placement that counted the flips
    # the ring: what a node spends on each message from another node beyond one a run (a speculating head's hops,
    # most of them flushed before they run), milliseconds of a core of its own (fit_cost finds it from speculation)
    message_ms: float = 0.0

    @property
    def mode(self) -> str:
        return "speculative" if self.speculate and (self.window or self.data_path == "lockstep") else "sequential"

    def score(self, placement: Mapping[int, str]) -> Scored:
        sequential = self.rate(placement, speculate=False)
        speculative = self.rate(placement, speculate=True) if self.mode == "speculative" else sequential
        return Scored(dict(placement), sequential, speculative)

    @property
    def knows_better(self) -> tuple[float, ...]:
        """The synthetic guesses' draws: fitted on the placement that counted the flip rates (fit_guesses), else
        on a cluster of one node per stage."""
        if self.guess_draws is not None:
            return self.guess_draws
        return knows_better(tuple(self.flips), data_path=self.data_path, window=self.window,
                            thresholds=tuple(self.thresholds), prefill_chunk=self.prefill_chunk)

    def rate(self, placement: Mapping[int, str], *, speculate: bool) -> float:
        return round(self.timing(placement, speculate=speculate).decode(PROMPT_TOKENS, NEW_TOKENS), 1)

    def timing(self, placement: Mapping[int, str], *, speculate: bool,
               knows_better: tuple[float, ...] | None = None) -> RingTiming | LockstepTiming:
        """The data path's simulation of `placement`, ready to decode."""
        draws = self.knows_better if knows_better is None else knows_better
        if self.data_path == "lockstep":
            def round_trip(node: str) -> float:
                return self.link_ms(COORDINATOR, node) + self.link_ms(node, COORDINATOR)

            return LockstepTiming(dict(placement), self.timings, round_trip, draws, speculate, self.thresholds,
                                  prefill_chunk=self.prefill_chunk, run_overhead_ms=self.run_overhead_ms)
        return RingTiming(dict(placement), self.timings, self.link_ms, draws, self.window if speculate else 0,
                          self.thresholds, prefill_chunk=self.prefill_chunk, run_overhead_ms=self.run_overhead_ms,
                          message_ms=self.message_ms)


@dataclass(frozen=True)
class Scored:
    placement: dict[int, str]  # stage -> node
    sequential: float  # predicted tokens/s
    speculative: float

    def rate(self, mode: str) -> float:
        return self.speculative if mode == "speculative" else self.sequential

    def stages_of(self, node: str) -> list[int]:
        return sorted(stage for stage, name in self.placement.items() if name == node)


def hostable_by(timings: Mapping[str, NodeTiming], n_stages: int) -> dict[int, list[str]]:
    """Per stage, the nodes that measured a pass of it (so they hold its graph)."""
    return {stage: [name for name, timing in timings.items() if any(s == stage for s, _ in timing.pass_ms)]
            for stage in range(n_stages)}


def ranked(model: TimingModel, start: Mapping[int, str], hostable: Mapping[int, Sequence[str]]) -> list[Scored]:
    """The starting placement first, then every other candidate, best first (by the model's mode).

    start must give every stage to a node in hostable; a stage no node can host is a ValueError."""
    stages = sorted(hostable)
    empty = [stage for stage in stages if not hostable[stage]]
    if empty:
        raise ValueError(f"no node can host stage {empty[0]}")
    first = model.score(start)
    count = 1
    for stage in stages:
        count *= len(hostable[stage])
    if count <= MAX_CANDIDATES:
        every = (dict(zip(stages, names)) for names in itertools.product(*(hostable[s] for s in stages)))
        others = [model.score(placement) for placement in every if placement != first.placement]
    else:
        others = [c for c in _climb(model, first, hostable) if c.placement != first.placement]
    return [first] + sorted(others, key=lambda c: -c.rate(model.mode))


def choose(model: TimingModel, current: Mapping[int, str], hostable: Mapping[int, Sequence[str]]) -> Scored:
    """The best placement, unless the current one is within MOVE_MARGIN of it (a move replays every
    sequence, and the prediction is not exact)."""
    candidates = ranked(model, current, hostable)
    best = max(candidates, key=lambda c: c.rate(model.mode))
    return best if best.rate(model.mode) > MOVE_MARGIN * candidates[0].rate(model.mode) else candidates[0]


def fit_cost(model: TimingModel, placement: Mapping[int, str], cost: Cost, *, speculate: bool,
             measured: float) -> float:
    """The value of one of the model's costs (milliseconds, to 0.01) that makes it predict what `placement`
    measured (tokens/s); 0 when the model without it is already no faster, or when no value of it would slow
    the model down to the measurement."""
    def rate(value: float) -> float:
        return dataclasses.replace(model, **{cost: value}).rate(placement, speculate=speculate)

    if rate(0.0) <= measured:
        return 0.0
    low, high = 0.0, 1.0
    while rate(high) > measured:
        if high >= MAX_COST_MS:
            return 0.0
        low, high = high, high * 2
    while high - low > 0.01:
        middle = (low + high) / 2
        low, high = (middle, high) if rate(middle) > measured else (low, middle)
    return round(high, 2)


def fit_guesses(model: TimingModel, placement: Mapping[int, str]) -> TimingModel:
    """The model whose synthetic guesses make `placement` (where the flip rates were counted) count them; the
    model as it is where it does not speculate or `placement` is not whole."""
    whole = len(placement) == len(model.flips) + 1 and set(placement.values()) <= set(model.timings)
    if model.mode != "speculative" or not whole:
        return model

    def counted(shares: tuple[float, ...]) -> tuple[float | None, ...]:
        timing = model.timing(placement, speculate=True, knows_better=shares)
        timing.decode(PROMPT_TOKENS, FIT_TOKENS)
        return timing.counted_flip_rates()

    return dataclasses.replace(model, guess_draws=search_shares(tuple(model.flips), counted))


def _climb(model: TimingModel, start: Scored, hostable: Mapping[int, Sequence[str]]) -> list[Scored]:
    """Every placement scored on the way up from start, one stage moved at a time."""
    seen, here = [start], start
    while True:
        moves = [model.score({**here.placement, stage: name}) for stage, names in hostable.items() for name in names
                 if here.placement[stage] != name]
        seen += moves
        better = max(moves, key=lambda c: c.rate(model.mode), default=here)
        if better.rate(model.mode) <= here.rate(model.mode):
            return seen
        here = better
