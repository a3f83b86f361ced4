"""The lockstep data path: the SPEED scheduler's ticks, each a round trip through the coordinator.

Every tick sends each node ONE message with all of its items (plus the closes, opens and cache
truncations waiting for it) and waits for every answer; hidden states that must move to another node's
stage ride in the next tick's message. A token therefore costs at least two link latencies.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from runtime.coordinator.cluster_view import ClusterView
from runtime.coordinator.remote_node import NodeFailure, NodeLost
from runtime.coordinator.requests import Request
from runtime.core.limits import cache_capacity
from runtime.core.node_state import NodeState
from runtime.core.scheduler import SequenceState, SpeedScheduler, TickPlan
from runtime.wire import speed_pb2 as pb
from runtime.wire.sampling import sampling_to_wire

log = logging.getLogger("speed.coordinator")


@dataclass
class _Control:
    """What waits for a node's next message."""

    closes: list[int] = field(default_factory=list)
    opens: list[pb.OpenSequence] = field(default_factory=list)
    truncations: list[pb.Truncation] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.opens or self.truncations or self.closes)

    def batch(self, tick: int, incarnation: int) -> pb.StepBatch:
        return pb.StepBatch(tick=tick, incarnation=incarnation, closes=self.closes, opens=self.opens,
                            truncations=self.truncations)


class LockstepPath:
    def __init__(self, view: ClusterView, *, prefill_chunk: int):
        self.view = view
        self.scheduler = SpeedScheduler(view.config.n_stages, prefill_chunk=prefill_chunk)
        self._control: dict[str, _Control] = defaultdict(_Control)
        self._handoff: dict[tuple[int, int], pb.Tensor] = {}  # hidden states for the next tick's stages
        self._ticks = itertools.count(1)

    def sequence(self, seq_id: int) -> SequenceState:
        return self.scheduler.sequences[seq_id]

    def add(self, seq_id: int, request: Request) -> SequenceState:
        seq = self.scheduler.add(seq_id, request.prompt_ids, **self.view.sequence_options(request))
        self._open(seq_id, request)
        return seq

    def settled(self, seq_id: int) -> bool:
        return True  # a finished sequence's counts are all here

    def end(self, seq_id: int) -> None:
        self.scheduler.remove(seq_id)
        for name in set(self.view.placement.values()):
            self._control[name].closes.append(seq_id)

    def assignment(self, placement: dict[int, str]) -> dict:
        """Nodes on lockstep need only their stages: each step message says what to run."""
        return {}

    async def replay(self, active: dict[int, Request]) -> None:
        self._control.clear()
        self._handoff.clear()
        for seq_id, request in active.items():
            self.scheduler.rewind(seq_id)
            self._open(seq_id, request)

    def forget(self) -> None:
        """The placement is gone: nothing waiting for a node means anything any more."""
        self._control.clear()
        self._handoff.clear()

    def _open(self, seq_id: int, request: Request) -> None:
        """Open the sequence on every node of the placement, in its next message."""
        capacity = cache_capacity(self.view.config, len(request.prompt_ids), request.options.max_new_tokens)
        for name in set(self.view.placement.values()):
            self._control[name].opens.append(
                pb.OpenSequence(seq_id=seq_id, sampling=sampling_to_wire(request.options.sampling), capacity=capacity,
                                plain_guesses=request.options.plain_guesses))

    async def advance(self, wake: asyncio.Event) -> list[tuple[int, str]]:
        """One tick. A lost node marks its sequences doubtful (the next reconcile replays them); a node
        that refused a step raises NodeFailure. Returns no single failed sequence: a tick fails whole."""
        plan = self.scheduler.plan()
        batches = self._batches(plan)
        names = list(batches)
        replies = await asyncio.gather(*(self._step(name, batches[name]) for name in names), return_exceptions=True)
        failures = [reply for reply in replies if isinstance(reply, BaseException)]
        if failures:
            self._handoff.clear()
            if all(isinstance(failure, NodeLost) for failure in failures):
                for name, reply in zip(names, replies):
                    if isinstance(reply, NodeLost):
                        log.warning("%s", reply)
                        self.view.nodes[name].reassign_later()  # also when it still serves: reassigned either way
                return []
            failure = next(f for f in failures if not isinstance(f, NodeLost))
            raise failure if isinstance(failure, NodeFailure) else NodeFailure(f"internal error: {failure!r}")
        self.view.metrics.tick()
        predictions, confidence, self._handoff = {}, {}, {}
        for reply in replies:
            for result in reply.results:
                key = (result.seq_id, result.start)
                if result.prediction >= 0:
                    predictions[key], confidence[key] = result.prediction, result.confidence
                if result.HasField("hidden"):
                    self._handoff[key] = result.hidden
        self.scheduler.apply(predictions, confidence)
        return []

    async def _step(self, name: str, batch: pb.StepBatch) -> pb.StepResults:
        started = time.perf_counter()
        reply = await self.view.nodes[name].step(batch)
        self.view.metrics.step_seconds(name, time.perf_counter() - started)
        return reply

    def _batches(self, plan: TickPlan) -> dict[str, pb.StepBatch]:
        """One message per node that has items this tick, carrying what waits for it."""
        placement = self.view.placement
        for cut in plan.truncations:
            self._control[placement[cut.stage]].truncations.append(
                pb.Truncation(seq_id=cut.seq_id, stage=cut.stage, length=cut.length))
        tick = next(self._ticks)
        batches: dict[str, pb.StepBatch] = {}
        for item in plan.items:
            name = placement[item.stage]
            if name not in batches:
                batches[name] = self._control.pop(name, _Control()).batch(tick, self.view.incarnation)
            step = batches[name].items.add(seq_id=item.seq_id, start=item.start, length=item.length, stage=item.stage,
                                           skip_prediction=not item.predict)
            if item.tokens is not None:
                step.tokens.extend(item.tokens)
            elif placement[item.stage - 1] != name:
                step.hidden.CopyFrom(self._handoff[(item.seq_id, item.start)])
        return batches

    async def idle(self) -> None:
        """With nothing to decode, deliver the waiting closes so nodes free their caches now."""
        nodes = self.view.nodes
        waiting = {name: control for name, control in self._control.items()
                   if control and nodes[name].state == NodeState.SERVING and nodes[name].assigned is not None}
        self._control.clear()
        if waiting:
            tick = next(self._ticks)
            await asyncio.gather(*(nodes[name].step(control.batch(tick, self.view.incarnation))
                                   for name, control in waiting.items()), return_exceptions=True)
