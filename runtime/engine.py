"""The coordinator's decoding loop: the SPEED core driving one remote executor per node.

Every tick sends each node ONE message with all of its items (plus the opens, cache truncations and
closes waiting for it) and waits for every answer; hidden states that must move to another node's
stage ride in the next tick's message. Requests arriving at any time join the next tick, so the
sequences of concurrent clients share ticks and ONNX Runtime calls.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import grpc

from runtime.config import ModelConfig
from runtime.reference import cache_capacity, decode_rate
from runtime.remote_node import SERVING, NodeFailure, RemoteNode
from runtime.sampling import SamplingParams
from runtime.speculative import speculation_stats
from runtime.speed_core import SpeedScheduler, TickPlan
from runtime.stopping import StopStrings
from runtime.text_stream import TextStream
from runtime.wire import speed_pb2 as pb
from runtime.wire.sampling import sampling_to_wire

log = logging.getLogger("speed.coordinator")


@dataclass(frozen=True)
class RequestFailed:
    code: grpc.StatusCode
    message: str


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    speculative: bool
    stop: StopStrings
    text: TextStream
    ignore_eos: bool = False
    plain_guesses: bool = False  # guess without the bundle's exit adapters
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # GenerateEvent, then Finished or RequestFailed
    cancelled: bool = False  # the client went away
    sent_tokens: int = 0
    admitted_at: float = 0.0
    first_token_at: float | None = None


@dataclass
class _Control:
    """What waits for a node's next message."""

    opens: list[pb.OpenSequence] = field(default_factory=list)
    truncations: list[pb.Truncation] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.opens or self.truncations or self.closes)

    def batch(self, tick: int) -> pb.StepBatch:
        return pb.StepBatch(tick=tick, opens=self.opens, truncations=self.truncations, closes=self.closes)


class Engine:
    def __init__(self, nodes: list[RemoteNode], *, config: ModelConfig, eos_id: int, prefill_chunk: int,
                 max_sequences: int):
        self.nodes = {node.name: node for node in nodes}
        self.owner = {stage: node.name for node in nodes for stage in node.spec.stages}
        self.config = config
        self.eos_id = eos_id
        self.max_sequences = max_sequences
        self.scheduler = SpeedScheduler(config.n_stages, prefill_chunk=prefill_chunk)
        self._pending: deque[Request] = deque()
        self._active: dict[int, Request] = {}
        self._control: dict[str, _Control] = defaultdict(_Control)
        self._handoff: dict[tuple[int, int], pb.Tensor] = {}  # hidden states for the next tick's stages
        self._ids = itertools.count(1)
        self._ticks = itertools.count(1)
        self._wake = asyncio.Event()

    @property
    def active_requests(self) -> int:
        return len(self._active) + len(self._pending)

    def submit(self, request: Request) -> None:
        self._pending.append(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._drop_cancelled()
            self._admit()
            if self._active:
                await self._tick()
            else:
                await self._flush_control()
                self._wake.clear()
                if not self._pending:
                    await self._wake.wait()

    def _admit(self) -> None:
        while self._pending and len(self._active) < self.max_sequences:
            request = self._pending.popleft()
            if request.cancelled:
                continue
            down = [node for node in self.nodes.values() if node.state != SERVING]
            if down:
                request.events.put_nowait(RequestFailed(grpc.StatusCode.UNAVAILABLE, (
                    f"{down[0].describe()} is {down[0].state}, so the cluster cannot serve; start the node (it "
                    "registers by itself) and retry")))
                continue
            seq_id = next(self._ids)
            self.scheduler.add(seq_id, request.prompt_ids, max_new_tokens=request.max_new_tokens,
                               context_length=self.config.context_length, speculate=request.speculative,
                               eos_id=None if request.ignore_eos else self.eos_id,
                               should_stop=request.stop or None)
            capacity = cache_capacity(self.config, len(request.prompt_ids), request.max_new_tokens)
            for name in self.nodes:
                self._control[name].opens.append(
                    pb.OpenSequence(seq_id=seq_id, sampling=sampling_to_wire(request.sampling), capacity=capacity,
                                    plain_guesses=request.plain_guesses))
            request.admitted_at = time.perf_counter()
            self._active[seq_id] = request

    async def _tick(self) -> None:
        plan = self.scheduler.plan()
        batches = self._batches(plan)
        names = list(batches)
        replies = await asyncio.gather(*(self.nodes[name].step(batches[name]) for name in names),
                                       return_exceptions=True)
        failures = [reply for reply in replies if isinstance(reply, BaseException)]
        if failures:
            failure = next((f for f in failures if isinstance(f, NodeFailure)), None)
            if failure is None:  # a bug, not a node: say so, and keep serving
                log.error("a step failed unexpectedly", exc_info=failures[0])
                failure = NodeFailure(f"internal error: {failures[0]!r}", grpc.StatusCode.INTERNAL)
            self._fail_all(failure)
            return
        predictions, self._handoff = {}, {}
        for reply in replies:
            for result in reply.results:
                if result.prediction >= 0:
                    predictions[(result.seq_id, result.start)] = result.prediction
                if result.HasField("hidden"):
                    self._handoff[(result.seq_id, result.start)] = result.hidden
        self.scheduler.apply(predictions)
        self._emit()

    def _batches(self, plan: TickPlan) -> dict[str, pb.StepBatch]:
        """One message per node that has items this tick, carrying what waits for it."""
        for cut in plan.truncations:
            self._control[self.owner[cut.stage]].truncations.append(
                pb.Truncation(seq_id=cut.seq_id, stage=cut.stage, length=cut.length))
        tick = next(self._ticks)
        batches: dict[str, pb.StepBatch] = {}
        for item in plan.items:
            name = self.owner[item.stage]
            if name not in batches:
                batches[name] = self._control.pop(name, _Control()).batch(tick)
            step = batches[name].items.add(seq_id=item.seq_id, start=item.start, length=item.length, stage=item.stage,
                                           skip_prediction=not item.predict)
            if item.tokens is not None:
                step.tokens.extend(item.tokens)
            elif self.owner[item.stage - 1] != name:
                step.hidden.CopyFrom(self._handoff[(item.seq_id, item.start)])
        return batches

    async def _flush_control(self) -> None:
        """With nothing to decode, deliver the waiting closes so nodes free their caches now."""
        waiting = {name: control for name, control in self._control.items()
                   if control and self.nodes[name].state == SERVING}
        self._control.clear()
        if waiting:
            tick = next(self._ticks)
            await asyncio.gather(*(self.nodes[name].step(control.batch(tick)) for name, control in waiting.items()),
                                 return_exceptions=True)

    def _emit(self) -> None:
        now = time.perf_counter()
        for seq_id, request in list(self._active.items()):
            seq = self.scheduler.sequences[seq_id]
            new = seq.generated[request.sent_tokens :]
            if request.first_token_at is None and (new or seq.done):
                request.first_token_at = now
            if not (new or seq.done):
                continue  # nothing committed this tick: no text to decode
            text = request.text.delta(seq.generated, final=seq.done)
            if new or text:
                request.events.put_nowait(pb.GenerateEvent(tokens=pb.TokenChunk(token_ids=new, text=text)))
                request.sent_tokens = len(seq.generated)
            if seq.done:
                tokens_per_s = decode_rate(len(seq.generated), now - request.first_token_at)
                stats = speculation_stats(seq)
                request.events.put_nowait(pb.GenerateEvent(finished=pb.Finished(
                    stop_reason=seq.stop_reason, text=request.text.text(seq.generated), token_ids=seq.generated,
                    prompt_tokens=len(seq.prompt), time_to_first_token_ms=(request.first_token_at - request.admitted_at)
                    * 1000, tokens_per_s=tokens_per_s, stats=pb.Stats(**stats), speculative=seq.speculate,
                    provider=self._providers())))
                self._end(seq_id)

    def _providers(self) -> str:
        return ",".join(sorted({node.info.provider for node in self.nodes.values() if node.info is not None}))

    def _end(self, seq_id: int) -> None:
        """Forget a sequence here and free its caches on every node that still holds them."""
        del self._active[seq_id]
        self.scheduler.remove(seq_id)
        for name, node in self.nodes.items():
            if node.state == SERVING:
                self._control[name].closes.append(seq_id)

    def _drop_cancelled(self) -> None:
        for seq_id, request in list(self._active.items()):
            if request.cancelled:
                self._end(seq_id)

    def _fail_all(self, failure: NodeFailure) -> None:
        """Every active sequence runs on every node: a failed node stops them all."""
        log.warning("%s (%d request(s) stopped)", failure, len(self._active))
        for seq_id, request in list(self._active.items()):
            request.events.put_nowait(RequestFailed(failure.code, str(failure)))
            self._end(seq_id)
        self._handoff.clear()
        for name, node in self.nodes.items():
            if node.state != SERVING:
                self._control.pop(name, None)
