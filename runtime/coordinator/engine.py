"""The coordinator's decoding loop: the SPEED core driving one remote executor per node.

Every tick sends each node ONE message with all of its items (plus the closes, opens and cache
truncations waiting for it) and waits for every answer; hidden states that must move to another node's
stage ride in the next tick's message. Requests join the next tick while sequence slots are free and
wait in a bounded first-come-first-served queue otherwise, so concurrent clients share ticks and
ONNX Runtime calls and no node is ever asked to hold more sequences than it can.

Between ticks the engine keeps the placement (which node runs which stage) true to the nodes that
serve: a lost node's stages move to nodes that can run them, a node that comes back takes its own
stages again, and every active sequence is rewound and replayed onto the new placement, which gives
the same text as an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import grpc

from runtime.coordinator.metrics import CoordinatorMetrics
from runtime.coordinator.remote_node import NodeFailure, NodeLost, RemoteNode
from runtime.core.config import ModelConfig
from runtime.core.generation import GenerationOptions, GenerationResult, SpeculationStats, steady_rate
from runtime.core.limits import cache_capacity
from runtime.core.node_state import NodeState
from runtime.core.placement import place, stages_of
from runtime.core.scheduler import SpeedScheduler, TickPlan
from runtime.core.stopping import StopStrings
from runtime.core.text_stream import TextStream
from runtime.wire import speed_pb2 as pb
from runtime.wire.generation import result_to_wire
from runtime.wire.sampling import sampling_to_wire

log = logging.getLogger("speed.coordinator")
NODE_BACKEND = "onnx"  # what nodes run: the bundle's ONNX graphs with ONNX Runtime


@dataclass(frozen=True)
class RequestFailed:
    code: grpc.StatusCode
    message: str


class QueueFull(Exception):
    """No sequence slot is free and the queue is full: the request is refused, not queued."""


@dataclass
class Request:
    prompt_ids: list[int]
    options: GenerationOptions
    speculative: bool  # the options' choice, or the cluster's where they leave it open
    guess_thresholds: tuple[float, ...]  # the confidence gate per early stage: the options', cluster's or bundle's
    stop: StopStrings
    text: TextStream
    generated: list[int] = field(default_factory=list)  # tokens the client already has (a resumed request)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # GenerateEvent, then Finished or RequestFailed
    cancelled: bool = False  # the client went away, or its deadline passed
    admitted: bool = False
    sent_tokens: int = 0
    admitted_at: float = 0.0
    first_token_at: float | None = None


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


class Engine:
    def __init__(self, nodes: list[RemoteNode], *, config: ModelConfig, eos_id: int, prefill_chunk: int,
                 max_queue: int, incarnation: int, metrics: CoordinatorMetrics):
        self.nodes = {node.name: node for node in nodes}
        self.home = {node.name: node.spec.stages for node in nodes}
        self.placement: dict[int, str] = {}  # stage -> the node running it; empty while a stage has none
        self.config = config
        self.eos_id = eos_id
        self.max_queue = max_queue
        self.incarnation = incarnation
        self.metrics = metrics
        self.scheduler = SpeedScheduler(config.n_stages, prefill_chunk=prefill_chunk)
        self._pending: deque[Request] = deque()
        self._active: dict[int, Request] = {}
        self._control: dict[str, _Control] = defaultdict(_Control)
        self._handoff: dict[tuple[int, int], pb.Tensor] = {}  # hidden states for the next tick's stages
        self._ids = itertools.count(1)
        self._ticks = itertools.count(1)
        self._wake = asyncio.Event()

    # --- what the service and status see ---------------------------------------------------------

    @property
    def serving(self) -> bool:
        return len(self.placement) == self.config.n_stages

    @property
    def can_serve(self) -> bool:
        """Every stage has a serving node that can run it (its own, or one that would take it over)."""
        return len(self._placement_now()) == self.config.n_stages

    @property
    def active_requests(self) -> int:
        return len(self._active)

    @property
    def queued_requests(self) -> int:
        return len(self._pending)

    @property
    def capacity(self) -> int:
        """Sequences the cluster can decode at once: every node in the placement holds each of them."""
        running = set(self.placement.values()) or set(self.nodes)
        return min(self.nodes[name].max_sequences for name in running)

    def sequences_on(self, name: str) -> int:
        return len(self._active) if name in self.placement.values() else 0

    def submit(self, request: Request) -> None:
        self._pending = deque(waiting for waiting in self._pending if not waiting.cancelled)
        free = self.capacity - len(self._active)
        if len(self._pending) - free >= self.max_queue:
            raise QueueFull(f"every sequence slot is taken ({len(self._active)} decoding) and {len(self._pending)} "
                            f"request(s) already wait, as many as coordinator.max_queue ({self.max_queue}) allows; "
                            "retry later, or raise max_queue or the nodes' max_sequences in the cluster file")
        self._pending.append(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self._wake.set()

    def wake(self) -> None:
        """Something changed outside the loop (a node came or went): look again."""
        self._wake.set()

    # --- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self._reconcile()
            self._drop_cancelled()
            self._admit()
            self._report()
            if self._active:
                await self._tick()
            else:
                await self._flush_control()
                if not self._pending or not self.serving:
                    await self._wake.wait()

    def _admit(self) -> None:
        while self._pending and len(self._active) < self.capacity:
            request = self._pending.popleft()
            if request.cancelled:
                continue
            if not self.serving:
                request.events.put_nowait(RequestFailed(grpc.StatusCode.UNAVAILABLE, self._unservable()))
                continue
            seq_id = (self.incarnation & 0xFFFF_FFFF) << 32 | next(self._ids)  # never reused by a later coordinator
            self.scheduler.add(seq_id, request.prompt_ids, max_new_tokens=request.options.max_new_tokens,
                               context_length=self.config.context_length, speculate=request.speculative,
                               guess_thresholds=request.guess_thresholds,
                               eos_id=None if request.options.ignore_eos else self.eos_id, should_stop=request.stop or None,
                               generated=request.generated)
            request.admitted, request.admitted_at = True, time.perf_counter()
            request.sent_tokens = len(request.generated)
            self._active[seq_id] = request
            self._open(seq_id, request)
            if self.scheduler.sequences[seq_id].done:  # a resumed request whose end was lost on the way
                self._emit()

    def _open(self, seq_id: int, request: Request) -> None:
        """Open the sequence on every node of the placement, in its next message."""
        capacity = cache_capacity(self.config, len(request.prompt_ids), request.options.max_new_tokens)
        for name in set(self.placement.values()):
            self._control[name].opens.append(
                pb.OpenSequence(seq_id=seq_id, sampling=sampling_to_wire(request.options.sampling), capacity=capacity,
                                plain_guesses=request.options.plain_guesses))

    def _unservable(self) -> str:
        placement = self._placement_now()
        stage = next((s for s in range(self.config.n_stages) if s not in placement), 0)
        node = next(self.nodes[name] for name, stages in self.home.items() if stage in stages)
        return (f"no serving node can run stage {stage}: {node.describe()} is {node.state} and no other node holds "
                "that stage's graph; start the node (it registers by itself) and retry")

    async def _tick(self) -> None:
        plan = self.scheduler.plan()
        batches = self._batches(plan)
        names = list(batches)
        replies = await asyncio.gather(*(self._step(name, batches[name]) for name in names), return_exceptions=True)
        failures = [reply for reply in replies if isinstance(reply, BaseException)]
        if failures:
            if all(isinstance(failure, NodeLost) for failure in failures):
                for name, reply in zip(names, replies):
                    if isinstance(reply, NodeLost):
                        log.warning("%s", reply)
                        self.nodes[name].doubt_sequences()  # also when it still serves: reassigned either way
                self._handoff.clear()  # the next reconcile assigns the stages again and replays every sequence
                return
            self._fail_tick([f for f in failures if not isinstance(f, NodeLost)][0])
            return
        self.metrics.tick()
        predictions, confidence, self._handoff = {}, {}, {}
        for reply in replies:
            for result in reply.results:
                key = (result.seq_id, result.start)
                if result.prediction >= 0:
                    predictions[key], confidence[key] = result.prediction, result.confidence
                if result.HasField("hidden"):
                    self._handoff[key] = result.hidden
        self.scheduler.apply(predictions, confidence)
        self._emit()

    async def _step(self, name: str, batch: pb.StepBatch) -> pb.StepResults:
        started = time.perf_counter()
        reply = await self.nodes[name].step(batch)
        self.metrics.step_seconds(name, time.perf_counter() - started)
        return reply

    def _batches(self, plan: TickPlan) -> dict[str, pb.StepBatch]:
        """One message per node that has items this tick, carrying what waits for it."""
        for cut in plan.truncations:
            self._control[self.placement[cut.stage]].truncations.append(
                pb.Truncation(seq_id=cut.seq_id, stage=cut.stage, length=cut.length))
        tick = next(self._ticks)
        batches: dict[str, pb.StepBatch] = {}
        for item in plan.items:
            name = self.placement[item.stage]
            if name not in batches:
                batches[name] = self._control.pop(name, _Control()).batch(tick, self.incarnation)
            step = batches[name].items.add(seq_id=item.seq_id, start=item.start, length=item.length, stage=item.stage,
                                           skip_prediction=not item.predict)
            if item.tokens is not None:
                step.tokens.extend(item.tokens)
            elif self.placement[item.stage - 1] != name:
                step.hidden.CopyFrom(self._handoff[(item.seq_id, item.start)])
        return batches

    async def _flush_control(self) -> None:
        """With nothing to decode, deliver the waiting closes so nodes free their caches now."""
        waiting = {name: control for name, control in self._control.items()
                   if control and self.nodes[name].state == NodeState.SERVING and self.nodes[name].assigned is not None}
        self._control.clear()
        if waiting:
            tick = next(self._ticks)
            await asyncio.gather(*(self.nodes[name].step(control.batch(tick, self.incarnation))
                                   for name, control in waiting.items()), return_exceptions=True)

    # --- placement and failover ------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Make the placement match the serving nodes; replay every active sequence when it changes."""
        while True:
            serving = self._serving_nodes()
            placement = self._placement_now()
            stale = [name for name in serving if self.nodes[name].assigned != tuple(stages_of(placement, name))]
            if placement == self.placement and not stale:
                return
            if len(placement) < self.config.n_stages:
                self._lose_placement()
                return
            moves = await asyncio.gather(*(self.nodes[name].assign(self.incarnation, stages_of(placement, name))
                                           for name in serving), return_exceptions=True)
            if any(isinstance(result, BaseException) for result in moves):
                for result in moves:
                    if isinstance(result, BaseException):
                        log.warning("%s", result)
                continue  # a node failed on the way: place again without it
            previous, self.placement = self.placement, placement
            self._replay(previous)
            return

    def _serving_nodes(self) -> list[str]:
        return [name for name, node in self.nodes.items() if node.state == NodeState.SERVING]

    def _placement_now(self) -> dict[int, str]:
        """Where the stages would run on the nodes serving now (some may be missing)."""
        can_run = {name: node.can_run for name, node in self.nodes.items()}
        return place(self.home, can_run, self._serving_nodes(), self.config.n_stages)

    def _lose_placement(self) -> None:
        if self.placement:
            log.warning("the cluster cannot serve: %s", self._unservable())
        self.placement = {}
        self._control.clear()
        self._handoff.clear()
        for seq_id in list(self._active):
            self._fail(seq_id, RequestFailed(grpc.StatusCode.UNAVAILABLE, self._unservable()))

    def _replay(self, previous: dict[int, str]) -> None:
        """Every active sequence starts again on the new placement from its prompt and committed tokens."""
        self._control.clear()
        self._handoff.clear()
        for seq_id, request in self._active.items():
            self.scheduler.rewind(seq_id)
            self._open(seq_id, request)
        if not previous:
            return
        moved = {stage: (previous.get(stage), name) for stage, name in self.placement.items()
                 if previous.get(stage) != name}
        lost = sorted({old for old, _ in moved.values() if old and self.nodes[old].state != NodeState.SERVING})
        tokens = sum(len(self.scheduler.sequences[s].prefill) for s in self._active)
        what = ", ".join(f"stage {stage} {old} -> {new}" for stage, (old, new) in sorted(moved.items()))
        event = f"failover (lost {', '.join(lost)})" if lost else "stages back home (a node registered)"
        log.log(logging.WARNING if lost or self._active else logging.INFO, "%s: %s; replaying %d sequence(s) (%d tokens)%s",
                event, what or "no stage moved", len(self._active), tokens,
                f": {', '.join(str(s) for s in self._active)}" if self._active else "")
        for name in lost:
            self.metrics.failover(name)
        self.metrics.sequences_replayed(len(self._active))

    # --- results ---------------------------------------------------------------------------------

    def _emit(self) -> None:
        now = time.perf_counter()
        for seq_id, request in list(self._active.items()):
            seq = self.scheduler.sequences[seq_id]
            new = seq.generated[request.sent_tokens :]
            if request.first_token_at is None and (new or seq.done):
                request.first_token_at = now
            if not (new or seq.done):
                continue  # nothing committed this tick: no text to decode
            self.metrics.tokens_committed(len(new))
            text = request.text.delta(seq.generated, final=seq.done)
            if new or text:
                request.events.put_nowait(pb.GenerateEvent(tokens=pb.TokenChunk(token_ids=new, text=text)))
                request.sent_tokens = len(seq.generated)
            if seq.done:
                self._finish(seq_id, request, now)

    def _finish(self, seq_id: int, request: Request, now: float) -> None:
        seq = self.scheduler.sequences[seq_id]
        for boundary, (flips, checks) in enumerate(zip(seq.stats.flips, seq.stats.checks)):
            self.metrics.flips(boundary, flips, checks)
        result = GenerationResult(
            text=request.text.text(seq.generated), token_ids=seq.generated, stop_reason=seq.stop_reason,
            prompt_tokens=len(seq.prompt), time_to_first_token_ms=(request.first_token_at - request.admitted_at) * 1000,
            tokens_per_s=steady_rate(len(seq.generated) - len(request.generated), now - request.first_token_at),
            speculative=seq.speculate, backend=NODE_BACKEND, provider=self._providers(), stats=SpeculationStats.of(seq))
        request.events.put_nowait(pb.GenerateEvent(finished=result_to_wire(result)))
        self._end(seq_id)

    def _providers(self) -> str:
        return ",".join(sorted({node.info.provider for node in self.nodes.values() if node.info is not None}))

    def _end(self, seq_id: int) -> None:
        """Forget a sequence here and free its caches on every node of the placement."""
        del self._active[seq_id]
        self.scheduler.remove(seq_id)
        for name in set(self.placement.values()):
            self._control[name].closes.append(seq_id)

    def _fail(self, seq_id: int, failure: RequestFailed) -> None:
        self._active[seq_id].events.put_nowait(failure)
        self._end(seq_id)

    def _drop_cancelled(self) -> None:
        for seq_id, request in list(self._active.items()):
            if request.cancelled:
                self._end(seq_id)
        self._pending = deque(request for request in self._pending if not request.cancelled)

    def _fail_tick(self, failure: BaseException) -> None:
        """A node refused a step, or a bug: the tick's requests fail and every node starts clean."""
        if not isinstance(failure, NodeFailure):
            log.error("a step failed unexpectedly", exc_info=failure)
            failure = NodeFailure(f"internal error: {failure!r}")
        log.warning("%s (%d request(s) stopped)", failure, len(self._active))
        for seq_id in list(self._active):
            self._fail(seq_id, RequestFailed(failure.code, str(failure)))
        self._handoff.clear()
        for node in self.nodes.values():
            node.assigned = None  # the next reconcile assigns every node again, which frees everything

    def _report(self) -> None:
        self.metrics.set_queue_depth(len(self._pending))
        self.metrics.set_active_requests(len(self._active))
        for name, node in self.nodes.items():
            self.metrics.set_sequences(name, self.sequences_on(name))
            self.metrics.node_state(name, node.state)
