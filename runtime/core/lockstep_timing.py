"""How fast the lockstep data path would decode one request with a given placement: the SPEED scheduler
itself (runtime/core/scheduler.py) ticked by a model whose early stages guess wrong at given rates, each
tick lasting as long as its slowest node: the round trip of its step message, plus the measured pass of
each of its items (interpolated by row count as on the ring) and the classifier for each item whose
prediction is read. Several items on one node are taken to cost the sum of their passes (one call per
graph is cheaper where stages share weights), and nodes on one machine share its cores
(runtime/core/shared_cores.py). Pure: no I/O, no tensors, no model.

As in runtime/core/ring_timing.py the model's tokens are a fixed sequence (runtime/core/synthetic_guesses.py):
early stages guess wrong at the rates the coordinator counts in lockstep, and a stage predicts nonsense from a
context that holds a wrong token, so flushes cost what they cost the real scheduler.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from runtime.core.grouping import PREFILL_CHUNK
from runtime.core.ring_timing import NodeTiming
from runtime.core.scheduler import SpeedScheduler
from runtime.core.shared_cores import shared_ends
from runtime.core.synthetic_guesses import Guesses, true_token


@dataclass
class LockstepTiming:
    placement: Mapping[int, str]  # stage -> node
    timings: Mapping[str, NodeTiming]
    round_trip_ms: Callable[[str], float]  # a step message to the node and its answer back, on the link alone
    knows_better: tuple[float, ...]  # per stage boundary, the synthetic guesses' draws (synthetic_guesses.Guesses)
    speculate: bool
    thresholds: tuple[float, ...] = ()  # per early stage, the confidence gate; () = every guess sent
    prefill_chunk: int = PREFILL_CHUNK
    seed: int = 0
    run_overhead_ms: float = 0.0  # what an item costs beside its pass: bookkeeping, serialization
    _counted: tuple[float | None, ...] = field(default=(), init=False)

    def decode(self, prompt_tokens: int, new_tokens: int) -> float:
        """Tokens per second of steady decoding (after the first token) of one request."""
        n_stages = len(self.placement)
        guesses = Guesses(tuple(self.knows_better), self.seed)
        scheduler = SpeedScheduler(n_stages, prefill_chunk=self.prefill_chunk)
        seq = scheduler.add(0, [true_token(p) for p in range(prompt_tokens)], max_new_tokens=new_tokens,
                            context_length=prompt_tokens + new_tokens + 1, speculate=self.speculate,
                            guess_thresholds=self.thresholds)  # every guess counts as sure: a gate of 1 holds all
        first_wrong: dict[int, int] = {}  # per stage: the first cached position that holds a wrong token
        carried: dict[int, tuple[int, ...]] = {}  # an item's input tokens by its start, travelling with it
        now, commits = 0.0, []
        while scheduler.active:
            plan = scheduler.plan()
            for cut in plan.truncations:
                if first_wrong.get(cut.stage, cut.length) >= cut.length:
                    first_wrong.pop(cut.stage, None)
            busy: dict[str, float] = defaultdict(float)
            predictions, moving = {}, {}
            for item in plan.items:
                tokens = item.tokens if item.tokens is not None else carried[item.start]
                moving[item.start] = tokens
                wrong = [item.start + i for i, token in enumerate(tokens) if token != true_token(item.start + i)]
                if wrong:
                    first_wrong.setdefault(item.stage, wrong[0])
                node = self.placement[item.stage]
                timing = self.timings[node]
                busy[node] += (timing.run_ms(item.stage, item.length) + self.run_overhead_ms
                               + (timing.head_ms if item.predict else 0.0))
                if item.predict:
                    predicted = item.start + item.length
                    predictions[(0, item.start)] = guesses.prediction(item.stage, predicted,
                                                                      right_context=item.stage not in first_wrong)
            carried = moving
            now += max((ms + self.round_trip_ms(node) for node, ms in self._ends(busy).items()), default=0.0)
            before = len(seq.generated)
            scheduler.apply(predictions)
            commits += [now] * (len(seq.generated) - before)
        self._counted = tuple(f / c if c else None for f, c in zip(seq.stats.flips, seq.stats.checks))
        if len(commits) < 2 or commits[-1] <= commits[0]:
            raise ValueError("the simulated scheduler committed fewer than two tokens")
        return (len(commits) - 1) * 1000 / (commits[-1] - commits[0])

    def counted_flip_rates(self) -> tuple[float | None, ...]:
        """Per stage boundary, the share of the checks found wrong by the last decode, as the coordinator counts
        them in lockstep; None where nothing was checked."""
        return self._counted

    def _ends(self, busy: dict[str, float]) -> dict[str, float]:
        """When each node's work of a tick ends, the nodes of one machine sharing its cores."""
        ends, machines = {}, defaultdict(dict)
        for node, ms in busy.items():
            timing = self.timings[node]
            if timing.shares_cores:
                machines[timing.machine][node] = (ms, timing.cores_used)
            else:
                ends[node] = ms
        for works in machines.values():
            ends.update(shared_ends(works, self.timings[next(iter(works))].machine_cores))
        return ends
