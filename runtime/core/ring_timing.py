"""How fast the ring data path would decode one request with a given placement: a discrete-event
simulation of the real ring state machines (`RingMachine`, one per node) whose passes take what the
nodes measured of themselves, over first-in first-out links of given one-way latency, with early-stage
guesses wrong at given rates. Pure: no I/O, no tensors, no model.

The model's tokens are a fixed sequence (runtime/core/synthetic_guesses.py): early stages guess wrong at
the rates the coordinator counts on the ring, and the last stage is always right, so the committed text is
the sequence and only the timing depends on the placement. A node runs
one batch of runs at a time; a batch costs the node's measured pass time of each run's stage at as many
rows as the run has positions (interpolated between the measured row counts, extrapolated past them),
plus the classifier for each run whose prediction is read, plus what the messages it received since
its last batch beyond one a run cost it (most of a speculating head's hops are flushed before they run,
but each was received). Nodes on one machine share its cores: batches
that run at once there take longer when they want more cores than it has (runtime/core/shared_cores.py).
The coordinator is taken to be beside the head: its messages cost nothing, and its own work takes no core.
A confidence gate of 1 (a stage that makes no guesses) is followed; any lower one is taken to send every
guess.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from runtime.core.grouping import PREFILL_CHUNK
from runtime.core.ring import Commit, Correction, Hop, RingMachine, Run
from runtime.core.shared_cores import SharedMachine
from runtime.core.synthetic_guesses import Guesses, true_token


@dataclass(frozen=True)
class NodeTiming:
    """What one node measured of itself: (stage, rows) -> milliseconds of one pass, and its classifier."""

    pass_ms: Mapping[tuple[int, int], float]
    head_ms: float
    machine: str = ""  # nodes with the same machine share its cores; "" = a machine of its own
    machine_cores: float = 0.0
    cores_used: float = 0.0  # by one of its passes; 0 = none it shares (its passes run on an accelerator)

    @property
    def shares_cores(self) -> bool:
        return bool(self.machine) and self.machine_cores > 0 and self.cores_used > 0

    @cached_property
    def _points(self) -> dict[int, list[tuple[int, float]]]:
        """Per stage, (rows, ms) by rows: run_ms is called for every simulated run."""
        points: dict[int, list[tuple[int, float]]] = {}
        for (stage, rows), ms in sorted(self.pass_ms.items()):
            points.setdefault(stage, []).append((rows, ms))
        return points

    def message_ms(self, on_a_core: float) -> float:
        """What handling a message that takes on_a_core milliseconds of a core takes this node: a node under a CPU
        quota of less than a core takes longer."""
        return on_a_core / self.cores_used if 0 < self.cores_used < 1 else on_a_core

    def run_ms(self, stage: int, positions: int) -> float:
        points = self._points.get(stage)
        if not points:
            raise ValueError(f"no pass time measured for stage {stage}")
        if len(points) == 1:
            return points[0][1] * positions / points[0][0]
        exact = next((ms for rows, ms in points if rows == positions), None)
        if exact is not None:
            return exact
        below = [p for p in points if p[0] <= positions] or points[:1]
        above = [p for p in points if p[0] >= positions] or points[-1:]
        (r0, m0), (r1, m1) = (below[-1], above[0]) if below[-1] != above[0] else (points[-2], points[-1])
        if r0 == r1:
            return m0
        return max(0.0, m0 + (m1 - m0) * (positions - r0) / (r1 - r0))


@dataclass
class _Node:
    name: str
    core: RingMachine
    timing: NodeTiming
    busy: bool = False
    runs: list[Run] = field(default_factory=list)  # of its batch running on a shared machine
    ends: int = 0  # how often its batch's end was moved: a scheduled end of an older count is void
    received_ms: float = 0.0  # what the messages it received since its last batch started cost it


@dataclass
class RingTiming:
    placement: Mapping[int, str]  # stage -> node
    timings: Mapping[str, NodeTiming]
    link_ms: Callable[[str, str], float]  # one-way latency from one node to another
    knows_better: tuple[float, ...]  # per stage boundary, the synthetic guesses' draws (synthetic_guesses.Guesses)
    window: int  # positions stage 0 may run ahead on its own guesses; 0 = sequential decoding
    thresholds: tuple[float, ...] = ()  # per early stage, the confidence gate; () = every guess sent
    prefill_chunk: int = PREFILL_CHUNK
    seed: int = 0
    run_overhead_ms: float = 0.0  # what a run costs beside its pass: bookkeeping, serialization, the hop's send
    message_ms: float = 0.0  # what a node spends on a message from another node beyond one a run, on a core of its own
    now: float = 0.0
    commits: list[float] = field(default_factory=list)  # when each token was committed

    def __post_init__(self):
        n_stages = len(self.placement)
        hosting: dict[str, list[int]] = {}
        for stage, name in sorted(self.placement.items()):
            hosting.setdefault(name, []).append(stage)
        self.nodes = {name: _Node(name, RingMachine(tuple(stages), n_stages, prefill_chunk=self.prefill_chunk),
                                  self.timings[name]) for name, stages in hosting.items()}
        self._guesses = Guesses(tuple(self.knows_better), self.seed)
        self._events: list = []
        self._order = itertools.count()
        self._link_free: dict[tuple[str, str], float] = {}
        self._machines = {timing.machine: SharedMachine(timing.machine_cores)
                          for name, timing in self.timings.items() if name in self.nodes and timing.shares_cores}

    def decode(self, prompt_tokens: int, new_tokens: int) -> float:
        """Tokens per second of steady decoding (after the first token) of one request."""
        prompt = [true_token(p) for p in range(prompt_tokens)]
        last_position = prompt_tokens + new_tokens - 2
        for node in self.nodes.values():
            node.core.open(1, prompt, last_position=last_position, window=self.window,
                           guess_thresholds=self.thresholds)
            self._kick(node)
        while self._events and len(self.commits) < new_tokens:
            self.now, _, action = heapq.heappop(self._events)
            action()
        if len(self.commits) < 2 or self.commits[-1] <= self.commits[0]:
            raise ValueError("the simulated ring committed fewer than two tokens")
        return (len(self.commits) - 1) * 1000 / (self.commits[-1] - self.commits[0])

    def counted_flip_rates(self) -> tuple[float | None, ...]:
        """Per stage boundary, the share of the checks found wrong by the decode so far, as the coordinator counts
        them on the ring; None where nothing was checked."""
        counts = {stage: count for node in self.nodes.values() if 1 in node.core.sequences
                  for stage, count in node.core.counts(1)[0].items()}
        return tuple(counts[b].flips / counts[b].checks if b in counts and counts[b].checks else None
                     for b in range(1, len(self.placement)))

    def _at(self, when: float, action) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def _send(self, src: str, dst: str, message) -> None:
        node = self.nodes[dst]
        if src == dst:
            self._deliver(node, message)
            return
        arrives = max(self.now + self.link_ms(src, dst), self._link_free.get((src, dst), 0.0))  # first in first out
        self._link_free[(src, dst)] = arrives
        self._at(arrives, lambda: self._receive(node, message))

    def _receive(self, node: _Node, message) -> None:
        node.received_ms += node.timing.message_ms(self.message_ms)
        self._deliver(node, message)

    def _deliver(self, node: _Node, message) -> None:
        node.core.receive(message)
        self._kick(node)

    def _route(self, node: _Node, message) -> None:
        if isinstance(message, Hop):
            self._send(node.name, self.placement[message.stage], message)
            return
        if isinstance(message, Commit) and message.seq_id == 1:
            self.commits.append(self.now)
        if isinstance(message, (Commit, Correction)):
            self._send(node.name, self.placement[0], message)

    def _kick(self, node: _Node) -> None:
        if node.busy:
            return
        runs = node.core.take_runs()
        for message in node.core.drain():
            self._route(node, message)
        if not runs:
            return
        node.busy = True
        # the cost of a run holds the message that brought its input: the batch pays for the messages beyond
        beyond = max(0.0, node.received_ms - len(runs) * node.timing.message_ms(self.message_ms))
        cost = beyond + sum(node.timing.run_ms(run.stage, len(run.tokens)) + self.run_overhead_ms
                            + (node.timing.head_ms if run.predict or run.final else 0.0) for run in runs)
        node.received_ms = 0.0
        machine = self._machines.get(node.timing.machine) if node.timing.shares_cores else None
        if machine is None:
            self._at(self.now + cost, lambda: self._finish(node, runs))
            return
        machine.start(node.name, cost, node.timing.cores_used, self.now)
        node.runs = runs
        self._schedule_ends(machine)

    def _schedule_ends(self, machine: SharedMachine) -> None:
        """A batch started or ended on `machine`: the others there now end at other times."""
        for name, at in machine.ends().items():
            node = self.nodes[name]
            node.ends += 1
            self._at(at, lambda node=node, count=node.ends: self._shared_end(node, machine, count))

    def _shared_end(self, node: _Node, machine: SharedMachine, count: int) -> None:
        if count != node.ends:
            return  # moved since
        machine.finish(node.name, self.now)
        self._schedule_ends(machine)
        self._finish(node, node.runs)

    def _finish(self, node: _Node, runs: list[Run]) -> None:
        for run in runs:
            if run.seq_id not in node.core.sequences:
                continue
            right = all(token == true_token(run.start + i) for i, token in enumerate(run.tokens))
            prediction = self._guesses.prediction(run.stage, run.end, run.gen, right_context=right)
            node.core.ran(run, prediction if run.predict or run.final else None, 1.0)
            for message in node.core.drain():
                self._route(node, message)
        node.busy = False
        self._kick(node)
