"""The ring data path on one node: on the node's stage worker thread, it feeds what arrived (the
coordinator's opens and closes, the other nodes' hops, corrections and commits) to the node's ring state
machine, runs the runs it hands out in one ONNX Runtime call per batch, and sends what comes out to the
next node, the node of stage 0 or the coordinator (one message for each round of work). The state machine
decides what runs; this shell only moves tensors and bytes.

EMULATION: with a link latency set, everything the node sends waits in a delay line for that long, and
so does what the coordinator sends it; the node itself never sleeps.
"""

from __future__ import annotations

import logging
import threading
import time

from nodes.coordinator_link import CoordinatorLink
from nodes.delay_line import DelayLine
from nodes.host import StepRefused, check_open
from nodes.node_metrics import NodeMetrics
from nodes.peer_links import PeerLinks
from nodes.stage_worker import StageWorker
from runtime.core.generation import MAX_WINDOW
from runtime.core.ring import Commit, Hop, RingError, RingMachine, Run
from runtime.core.run_ahead import RunAheadPrice
from runtime.core.scheduler import Item, TickPlan, Truncate
from runtime.executor.cpu_profile import CpuProfile
from runtime.executor.stage_model import StageModel
from runtime.executor.tick_executor import TickExecutor
from runtime.wire import speed_pb2 as pb
from runtime.wire.framed_connection import FramedConnection
from runtime.wire.ring import commit_to_wire

log = logging.getLogger("speed.node")


class RingWorker:
    def __init__(self, model: StageModel, *, name: str, stages: tuple[int, ...], placement: dict[int, str],
                 links: PeerLinks, max_sequences: int, prefill_chunk: int, delay_s: float, metrics: NodeMetrics,
                 profile: CpuProfile, worker: StageWorker):
        """placement: stage -> the name of the node running it, this one included; worker: the node's stage
        worker, which runs `work` with what arrived for this ring."""
        self.name = name
        self.worker = worker
        self.cfg = model.config
        self.placement = placement
        self.links = links
        self.max_sequences = max_sequences
        self.metrics = metrics
        self.core = RingMachine(stages, self.cfg.n_stages, prefill_chunk=prefill_chunk)
        self.profile = profile
        self.executor = TickExecutor(model, slots=max_sequences, capacity=1, stages=stages, hand_over_locally=False,
                                     profile=profile)
        self._delay_s = delay_s
        self._coordinator: CoordinatorLink | None = None  # once its link is attached
        self._events = pb.RingEvents()  # for the coordinator: commits, closed sequences' counts, failures
        # from the coordinator: straight to the worker, unless a latency is emulated
        self._arrivals = DelayLine(delay_s) if delay_s else None
        self._deferred: list[Run] = []
        self._price = RunAheadPrice()  # what the head's run-ahead costs and saves, measured
        self._ran_at: dict[tuple[int, int], float] = {}  # (sequence, position to commit) -> when stage 0 ran it
        if self._arrivals is not None:
            threading.Thread(target=self._pump_arrivals, daemon=True, name=f"ring-arrivals-{name}").start()

    # --- called from the links' and the gRPC handlers' threads ----------------------------------

    def control(self, message: pb.RingControl) -> None:
        if self._arrivals is None:
            self.worker.arrive(self, "control", message)
        else:
            self._arrivals.put(message)

    def deliver(self, messages: list) -> None:
        self.worker.arrive(self, "messages", messages)

    def stop(self) -> None:
        """Its links end; what still arrives for it is dropped by the worker."""
        if self._arrivals is not None:
            self._arrivals.close()
        if self._coordinator is not None:
            self._coordinator.close()
        self.links.close()

    @property
    def open_sequences(self) -> int:
        return len(self.core.sequences)

    def _pump_arrivals(self) -> None:
        for batch in self._arrivals.batches():
            for message in batch:
                self.worker.arrive(self, "control", message)

    # --- on the stage worker's thread ------------------------------------------------------------

    def attach(self, connection: FramedConnection) -> bool:
        """The coordinator's link for this placement, which its events go to from now on; False when it has one."""
        if self._coordinator is not None:
            return False
        self._coordinator = CoordinatorLink(connection, delay_s=self._delay_s, profile=self.profile)
        return True

    def work(self, arrivals: list) -> bool:
        """Apply what arrived, run what can run, send what comes out; whether anything ran (then the worker
        calls again before it waits, as running may have made more runnable)."""
        for kind, payload in arrivals:
            if kind == "control":
                self._apply_control(payload)
            else:
                self._receive(payload)
        runs = self._deferred + self.core.take_runs()
        self._route()  # corrections found while taking hops
        if runs:
            self._execute(runs)
            self._route()
        self._report()
        return bool(runs)

    def _report(self) -> None:
        """What this round of work has for the coordinator, in one message (before its link is attached the ring
        has no sequence, so nothing)."""
        events = self._events
        if events.commits or events.closed or events.failed:
            if self._coordinator is not None:
                self._coordinator.send(events)
            self._events = pb.RingEvents()

    def _apply_control(self, control: pb.RingControl) -> None:
        for seq_id in control.closes:
            self._close(seq_id, report=True)
        for o in control.opens:
            try:
                self._open(o)
            except (StepRefused, RingError) as exc:
                self._events.failed.add(seq_id=o.sequence.seq_id, message=str(exc))

    def _open(self, o: pb.RingOpen) -> None:
        seq_id = o.sequence.seq_id
        if seq_id in self.core.sequences:
            raise RingError(f"sequence {seq_id} is already open on node {self.name}")
        if len(self.core.sequences) >= self.max_sequences:
            raise RingError(f"node {self.name} holds at most {self.max_sequences} sequences at once")
        sampling, capacity, plain_guesses = check_open(o.sequence, self.cfg.context_length)
        if not 0 < len(o.prefill) <= o.last_position + 1 <= capacity:
            raise RingError(f"sequence {seq_id}: needs a prefill of 1 to {capacity} tokens and a last position "
                            "inside the capacity")
        if not all(0 <= t < self.cfg.vocab_size for t in o.prefill) or not 0 <= o.window <= MAX_WINDOW:
            raise RingError(f"sequence {seq_id}: token ids must be in 0..{self.cfg.vocab_size - 1} and the window "
                            f"0 to {MAX_WINDOW}")
        self.core.open(seq_id, list(o.prefill), last_position=o.last_position, window=o.window,
                       guess_thresholds=tuple(o.guess_thresholds), prompt_length=o.prompt_tokens)
        self.executor.open(seq_id, sampling, capacity, plain_guesses=plain_guesses)

    def _close(self, seq_id: int, *, report: bool) -> None:
        if seq_id not in self.core.sequences:
            return
        if report:
            counts, held = self.core.counts(seq_id)
            self._events.closed.add(seq_id=seq_id, held_guesses=held, stages=[
                pb.RingStageStats(stage=stage, runs=c.runs, checks=c.checks, flips=c.flips, dropped=c.dropped,
                                  positions=c.positions)
                for stage, c in sorted(counts.items())])
        self.core.close(seq_id)
        self.executor.close(seq_id)
        self._ran_at = {key: at for key, at in self._ran_at.items() if key[0] != seq_id}
        self._deferred = [run for run in self._deferred if run.seq_id != seq_id]

    def _receive(self, messages: list) -> None:
        for message in messages:
            try:
                self._take(message)
            except RingError as exc:
                log.warning("dropped a message the ring cannot take: %s", exc)

    def _take(self, message) -> None:
        if isinstance(message, Commit):
            ran_at = self._ran_at.pop((message.seq_id, message.position), None)
            if ran_at is not None:
                self._price.waited(time.perf_counter() - ran_at)
                self.core.run_ahead = self._price.threshold
        self.core.receive(message)

    def _route(self) -> None:
        outgoing: dict[str, list] = {}  # one message a peer for everything that leaves together
        for message in self.core.drain():
            if isinstance(message, Commit):
                self._events.commits.append(commit_to_wire(message))
            target = self.placement[message.stage if isinstance(message, Hop) else 0]
            if target == self.name:
                self._take(message)
            else:
                outgoing.setdefault(target, []).append(message)
        for target, messages in outgoing.items():
            self.links.send(target, messages)

    def _execute(self, runs: list[Run]) -> None:
        """One batch: at most one run per (sequence, start), the others wait for the next batch."""
        batch, self._deferred, keys = [], [], set()
        for run in runs:
            key = (run.seq_id, run.start)
            (self._deferred if key in keys else batch).append(run)
            keys.add(key)
        plan = TickPlan([Truncate(run.seq_id, run.stage, run.start) for run in batch],
                        [Item(run.seq_id, run.start, len(run.tokens), run.stage, run.tokens if run.stage == 0 else None,
                              final=run.final, predict=run.predict) for run in batch], [])
        hidden_in = {(run.seq_id, run.start): run.payload for run in batch if run.stage > 0}
        started = time.perf_counter()
        try:
            result = self.executor.run(plan, hidden_in)
        except Exception as exc:  # a bug: these sequences fail, the node keeps serving the others
            log.exception("a ring batch failed")
            for seq_id in {run.seq_id for run in batch}:
                self._events.failed.add(seq_id=seq_id, message=f"node {self.name} failed to run it: {exc!r}")
                self._close(seq_id, report=False)
            return
        finished = time.perf_counter()
        self.metrics.step(finished - started, sum(len(run.tokens) for run in batch))
        heads = [run for run in batch if run.stage == 0 and not run.final]
        if heads:
            self._price.ran(finished - started)
            self._ran_at |= {(run.seq_id, run.end): finished for run in heads}
        for run in batch:
            key = (run.seq_id, run.start)
            self.core.ran(run, result.predictions.get(key), result.confidence.get(key, 1.0), result.handoff.get(key))
