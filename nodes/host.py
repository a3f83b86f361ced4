"""The stages one node hosts, driven by step messages: each message is checked whole before any of it
runs, so a malformed one changes nothing and the sequences of other callers go on undisturbed.

A node serves one coordinator incarnation at a time. The coordinator assigns it its stages (its own
from the cluster file, or more after another node was lost) and every assignment starts from no open
sequence; a newer incarnation, announced at registration, frees everything an older one opened.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable

import grpc
import numpy as np

from runtime.core.errors import SpeedError
from runtime.core.limits import MAX_TEMPERATURE
from runtime.core.sampling import SamplingParams
from runtime.core.scheduler import Item, TickPlan, Truncate
from runtime.executor.cpu_profile import CpuProfile
from runtime.executor.stage_model import StageModel
from runtime.executor.tick_executor import TickExecutor
from runtime.wire import speed_pb2 as pb
from runtime.wire.sampling import sampling_from_wire
from runtime.wire.tensor import pack, unpack

# What one step message may make a node allocate is bounded before any of it is read element by element:
# counts come from the repeated fields' lengths, so a refused message costs no more than its own bytes.
CLOSES_PER_SLOT = 64  # closes in one message, per sequence slot: the sequences that ended since the last one
TRUNCATIONS_PER_ROW = 16  # truncations in one message, per (sequence slot, hosted stage)


class StepRefused(SpeedError):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def check_open(o: pb.OpenSequence, context_length: int) -> tuple[SamplingParams, int, bool]:
    """An open's sampling, capacity and plain_guesses, or StepRefused naming what is wrong."""
    if not 1 <= o.capacity <= context_length:
        raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"sequence {o.seq_id}: capacity must be 1 to "
                          f"{context_length} positions (the model's context), got {o.capacity}")
    if not o.sampling.temperature <= MAX_TEMPERATURE:  # also NaN and infinity
        raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"sequence {o.seq_id}: temperature must be 0 (greedy) "
                          f"to {MAX_TEMPERATURE:g}, got {o.sampling.temperature}")
    try:
        return sampling_from_wire(o.sampling), o.capacity, o.plain_guesses
    except SpeedError as exc:
        raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"sequence {o.seq_id}: {exc}") from None


class StageHost:
    def __init__(self, model: StageModel, *, name: str, stages: tuple[int, ...], max_sequences: int,
                 idle_timeout_s: float, hostable: Iterable[int] = (), clock: Callable[[], float] = time.monotonic):
        """stages: the node's own; hostable: every stage whose graph the model holds (its own included)."""
        self.name = name
        self.model = model
        self.cfg = model.config
        self.home = tuple(sorted(stages))
        self.hostable = tuple(sorted({*stages, *hostable}))
        self.max_sequences = max_sequences
        self.max_closes = CLOSES_PER_SLOT * max_sequences
        self.idle_timeout_s = idle_timeout_s
        self.incarnation = 0  # of the coordinator it serves; 0 before any
        self._clock = clock
        self.profile = CpuProfile()  # every executor it makes counts here, and so does the ring worker
        self._host(self.home)

    def _host(self, stages: Iterable[int]) -> None:
        """Run these stages from now on, with no sequence open."""
        self.stages = tuple(sorted(stages))
        self.max_items = self.max_sequences * max(len(self.stages), 1)  # one per (sequence, stage)
        self.max_truncations = TRUNCATIONS_PER_ROW * self.max_items
        self.executor = TickExecutor(self.model, slots=self.max_sequences, capacity=1, stages=self.stages,
                                     profile=self.profile)
        self._last_used: dict[int, float] = {}
        self._capacity: dict[int, int] = {}  # positions each open sequence may use

    @property
    def open_sequences(self) -> int:
        return len(self.executor.open_sequences)

    def assign(self, incarnation: int, stages: Collection[int]) -> None:
        """Serve `incarnation` with `stages`, every sequence freed (its caches are rebuilt by replay)."""
        if len(stages) > self.cfg.n_stages:
            raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name} can be assigned at most the "
                              f"model's {self.cfg.n_stages} stages, got a list of {len(stages)}")
        stages = sorted(set(stages))
        if incarnation < self.incarnation:
            raise StepRefused(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name} serves coordinator incarnation "
                              f"{self.incarnation}; an older one ({incarnation}) cannot assign it stages")
        missing = [stage for stage in stages if stage not in self.hostable]
        if missing:
            raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name} holds the graphs of stages "
                              f"{list(self.hostable)}, not of stage {missing[0]}; list it under the node's "
                              "standby_stages in the cluster file to let it take that stage over")
        self.incarnation = incarnation
        self._host(stages)

    def adopt(self, incarnation: int) -> None:
        """A coordinator announced at registration: a newer incarnation frees everything of older ones."""
        if incarnation > self.incarnation:
            self.incarnation = incarnation
            self._host(self.home)

    def step(self, batch: pb.StepBatch) -> pb.StepResults:
        if batch.incarnation != self.incarnation:
            raise StepRefused(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name} serves coordinator incarnation "
                              f"{self.incarnation}, not {batch.incarnation}; the sender is not its coordinator")
        self._check_counts(batch)
        for seq_id in batch.closes:  # freeing is never refused, so no slot outlives a refused message
            self.close(seq_id)
        self.expire_idle()
        opens = self._check_opens(batch.opens)
        plan, hidden_in = self._check_steps(batch, opens)
        for seq_id, (sampling, capacity, plain_guesses) in opens.items():
            self.executor.open(seq_id, sampling, capacity, plain_guesses=plain_guesses)
            self._capacity[seq_id] = capacity
        now = self._clock()
        for seq_id in {*opens, *(t.seq_id for t in plan.truncations), *(i.seq_id for i in plan.items)}:
            self._last_used[seq_id] = now
        result = self.executor.run(plan, hidden_in)
        with self.profile.timed("serialize"):
            reply = pb.StepResults(tick=batch.tick)
            for item in plan.items:
                key = (item.seq_id, item.start)
                out = reply.results.add(seq_id=item.seq_id, start=item.start, prediction=result.predictions.get(key, -1),
                                        confidence=result.confidence.get(key, 0.0))
                if key in result.handoff:
                    out.hidden.CopyFrom(pack(result.handoff[key]))
        return reply

    def close(self, seq_id: int) -> None:
        self.executor.close(seq_id)
        self._last_used.pop(seq_id, None)
        self._capacity.pop(seq_id, None)

    def expire_idle(self) -> list[int]:
        """Free the caches of sequences no step has touched for idle_timeout_s (a caller that went away)."""
        deadline = self._clock() - self.idle_timeout_s
        expired = [seq_id for seq_id, used in self._last_used.items() if used < deadline]
        for seq_id in expired:
            self.close(seq_id)
        return expired

    def warm_up(self) -> None:
        """One real forward pass of every hosted stage and the classifier, so the first request is not slow. Early
        stages make no guess: a guess head is loaded at the first guess a gate lets through."""
        seq_id = 2**64 - 1  # no caller has opened anything yet
        batch = pb.StepBatch(opens=[pb.OpenSequence(seq_id=seq_id, capacity=8)], incarnation=self.incarnation)
        for stage in self.stages:
            item = batch.items.add(seq_id=seq_id, start=0, length=8, stage=stage,
                                   skip_prediction=stage != self.cfg.n_stages - 1)
            if stage == 0:
                item.tokens.extend([0] * 8)
            elif stage - 1 not in self.stages:
                item.hidden.CopyFrom(pack(np.zeros((8, self.cfg.d_model), np.float32)))
            self.step(batch)
            batch = pb.StepBatch(incarnation=self.incarnation)
        self.close(seq_id)

    def _check_counts(self, batch: pb.StepBatch) -> None:
        """Refuse a message with more closes, opens, truncations or items than a coordinator ever sends."""
        if len(batch.opens) > self.max_sequences:
            raise StepRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"node {self.name} holds at most {self.max_sequences} "
                              f"sequences at once, so one step message cannot open {len(batch.opens)}")
        for what, count, limit in (("closes", len(batch.closes), self.max_closes),
                                   ("truncations", len(batch.truncations), self.max_truncations),
                                   ("items", len(batch.items), self.max_items)):
            if count > limit:
                raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"a step message to node {self.name} carries at most "
                                  f"{limit} {what} (for {self.max_sequences} sequences and {len(self.stages)} stage(s)), "
                                  f"got {count}")

    def _check_opens(self, opens) -> dict[int, tuple[SamplingParams, int, bool]]:
        checked = {}
        for o in opens:
            if self.executor.is_open(o.seq_id) or o.seq_id in checked:
                raise StepRefused(grpc.StatusCode.ALREADY_EXISTS, f"sequence {o.seq_id} is already open on node {self.name}")
            checked[o.seq_id] = check_open(o, self.cfg.context_length)
        if len(self.executor.open_sequences) + len(checked) > self.max_sequences:
            raise StepRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"node {self.name} holds at most {self.max_sequences} "
                              "sequences at once; close one first or raise max_sequences in the cluster file")
        return checked

    def _check_steps(self, batch: pb.StepBatch, opens: dict) -> tuple[TickPlan, dict]:
        """The batch as a plan for the executor, refused whole if any part of it cannot run."""
        lengths: dict[tuple[int, int], int] = {}  # (sequence, stage) -> cache length once truncations apply
        capacity = {**self._capacity, **{seq_id: c for seq_id, (_, c, _) in opens.items()}}

        def length_of(seq_id: int, stage: int) -> int:
            if (seq_id, stage) not in lengths:
                lengths[(seq_id, stage)] = 0 if seq_id in opens else self.executor.cache_length(seq_id, stage)
            return lengths[(seq_id, stage)]

        truncations = []
        for t in batch.truncations:
            self._check_sequence_and_stage(t.seq_id, t.stage, opens)
            if not 0 <= t.length <= length_of(t.seq_id, t.stage):
                raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"sequence {t.seq_id} stage {t.stage}: cannot "
                                  f"truncate {length_of(t.seq_id, t.stage)} cache entries to {t.length}")
            lengths[(t.seq_id, t.stage)] = t.length
            truncations.append(Truncate(t.seq_id, t.stage, t.length))

        items, hidden_in, seen = [], {}, set()
        last_stage = self.cfg.n_stages - 1
        for i in batch.items:
            where = f"sequence {i.seq_id} stage {i.stage} item at {i.start}"
            self._check_sequence_and_stage(i.seq_id, i.stage, opens)
            if (i.seq_id, i.stage) in seen:
                raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: one item per sequence and stage per step")
            seen.add((i.seq_id, i.stage))
            if i.length < 1 or i.start != length_of(i.seq_id, i.stage):
                raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: the stage's cache holds "
                                  f"{length_of(i.seq_id, i.stage)} positions, so the next item must start there "
                                  "and have a length of at least 1")
            limit = capacity[i.seq_id]
            if i.start + i.length > limit:
                raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: runs past the {limit} positions the "
                                  "sequence was opened with")
            tokens = None
            if i.stage == 0:
                tokens = tuple(i.tokens) if len(i.tokens) == i.length else ()  # counted before they are read
                if len(tokens) != i.length or not all(0 <= t < self.cfg.vocab_size for t in tokens):
                    raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: needs {i.length} token ids, each "
                                      f"in 0..{self.cfg.vocab_size - 1}")
            elif i.stage - 1 in self.stages:
                if self.executor.held_length((i.seq_id, i.start)) != i.length:
                    raise StepRefused(grpc.StatusCode.FAILED_PRECONDITION, f"{where}: this node did not run stage "
                                      f"{i.stage - 1} of these {i.length} positions last step")
            else:
                try:
                    with self.profile.timed("serialize"):
                        hidden_in[(i.seq_id, i.start)] = unpack(i.hidden, dtype="float32",
                                                                shape=(i.length, self.cfg.d_model),
                                                                what=f"{where}: the hidden state", finite=True)
                except SpeedError as exc:
                    raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            lengths[(i.seq_id, i.stage)] = i.start + i.length
            final = i.stage == last_stage
            items.append(Item(i.seq_id, i.start, i.length, i.stage, tokens, final=final,
                              predict=final or not i.skip_prediction))
        return TickPlan(truncations, items, []), hidden_in

    def _check_sequence_and_stage(self, seq_id: int, stage: int, opens: dict) -> None:
        if seq_id not in opens and not self.executor.is_open(seq_id):
            raise StepRefused(grpc.StatusCode.NOT_FOUND, f"sequence {seq_id} is not open on node {self.name}; open it "
                              "in a step message first (it may have expired after the idle timeout)")
        if stage not in self.stages:
            raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name} hosts stages "
                              f"{list(self.stages)}, not stage {stage}")
