"""The coordinator's decoding loop: admission, placement and failover, whatever data path carries the
work (`lockstep`: the SPEED scheduler's ticks through the coordinator; `ring`: nodes forwarding to each
other).

Requests join while sequence slots are free and wait in a bounded first-come-first-served queue
otherwise, so concurrent clients share the nodes' ONNX Runtime calls and no node is ever asked to hold
more sequences than it can.

Between rounds the engine keeps the placement (which node runs which stage) true to the nodes that
serve: a lost node's stages move to nodes that can run them, a node that comes back takes its own
stages again, and every active sequence is replayed onto the new placement from its prompt and
committed tokens, which gives the same text as an uninterrupted run. Under `placement: auto` the stages'
homes are chosen again (choose_homes) whenever the serving nodes change; a draining node counts as gone
while it still serves, so its stages move before it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence

from runtime.coordinator.cluster_view import ClusterView
from runtime.coordinator.data_path import DataPath
from runtime.coordinator.metrics import CoordinatorMetrics
from runtime.coordinator.remote_node import NodeFailure, RemoteNode
from runtime.coordinator.requests import Request
from runtime.core.config import ModelConfig
from runtime.core.generation import GenerationResult, SpeculationStats, steady_rate
from runtime.core.node_state import NodeState
from runtime.core.placement import place, stages_of
from runtime.core.request import FailureKind, RequestFailed, TextChunk

log = logging.getLogger("speed.coordinator")
NODE_BACKEND = "onnx"  # what nodes run: the bundle's ONNX graphs with ONNX Runtime
Homes = dict[str, Sequence[int]]  # node -> the stages it runs while it serves
RATES_KEPT = 16  # requests whose tokens/s are kept, per mode, to compare a placement's prediction with


class Engine:
    def __init__(self, nodes: list[RemoteNode], *, config: ModelConfig, eos_id: int, max_queue: int, incarnation: int,
                 metrics: CoordinatorMetrics, data_path: Callable[[ClusterView], DataPath],
                 choose_homes: Callable[[list[RemoteNode], dict[int, str]], Awaitable[Homes | None]] | None = None):
        """data_path: makes the data path that carries the work, given this engine's view of the cluster;
        choose_homes: when given, chooses the serving nodes' stages whenever they change (placement: auto),
        from where the stages would run without a choice; None keeps the file's."""
        self.nodes = {node.name: node for node in nodes}
        self.home: Homes = {node.name: node.spec.stages for node in nodes}  # the cluster file's
        self.choose_homes = choose_homes
        self._chosen: tuple[frozenset[str], Homes | None] = (frozenset(), None)  # for which serving nodes
        self.leaving: set[str] = set()  # draining nodes: serving still, but their stages move away
        # per stage boundary, over every finished request: guesses found wrong, guesses checked
        self.flips_seen, self.checks_seen = [0] * (config.n_stages - 1), [0] * (config.n_stages - 1)
        # tokens/s of the last requests that decoded alone on the current placement, by whether they speculated
        self.alone_rates: dict[bool, deque[float]] = {False: deque(maxlen=RATES_KEPT), True: deque(maxlen=RATES_KEPT)}
        self._nodes_timing = 0  # nodes timing their passes now (timing_nodes)
        self.view = ClusterView(config=config, nodes=self.nodes, metrics=metrics, incarnation=incarnation,
                                eos_id=eos_id)
        self.config = config
        self.max_queue = max_queue
        self.incarnation = incarnation
        self.metrics = metrics
        self.data_path = data_path(self.view)
        self._pending: deque[Request] = deque()
        self._active: dict[int, Request] = {}
        self._wake = asyncio.Event()
        self._last_id = secrets.randbits(61)  # the last sequence id given

    @property
    def placement(self) -> dict[int, str]:
        """stage -> the node running it; empty while a stage has none."""
        return self.view.placement

    # --- what the service and status see ---------------------------------------------------------

    @property
    def serving(self) -> bool:
        return len(self.placement) == self.config.n_stages

    @property
    def can_serve(self) -> bool:
        """Every stage has a serving node that can run it (its own, or one that would take it over)."""
        return len(self._placement_now()) == self.config.n_stages

    @property
    def placement_settled(self) -> bool:
        """Every serving node runs the stages meant for it: none is being chosen or moved."""
        serving = self._serving_nodes()
        chosen = self.choose_homes is None or self._chosen[0] == frozenset(serving)
        return chosen and self._placement_now() == self.placement and all(
            self.nodes[name].assigned == tuple(stages_of(self.placement, name)) for name in serving)

    def measured_tokens_per_s(self, speculative: bool) -> float:
        """The median tokens/s of the last requests that decoded alone on the current placement; 0 when none."""
        rates = self.alone_rates[speculative]
        return statistics.median(rates) if rates else 0.0

    @contextlib.contextmanager
    def timing_nodes(self) -> Iterator[None]:
        """While nodes time their passes (between steps, for placement), the requests decoding are slowed by it:
        none of them measures the placement's rate."""
        self._nodes_timing += 1
        for request in self._active.values():
            request.alone = False
        try:
            yield
        finally:
            self._nodes_timing -= 1

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

    def add(self, node: RemoteNode) -> None:
        """A node that joined: no stage of its own, any it holds when the placement gives it one."""
        self.nodes[node.name] = node
        self.home[node.name] = node.spec.stages
        self.wake()

    def submit(self, request: Request) -> None:
        self._pending = deque(waiting for waiting in self._pending if not waiting.cancelled)
        free = self.capacity - len(self._active)
        if len(self._pending) - free >= self.max_queue:
            raise RequestFailed(FailureKind.OVERLOADED,
                                f"every sequence slot is taken ({len(self._active)} decoding) and {len(self._pending)} "
                                f"request(s) already wait, as many as coordinator.max_queue ({self.max_queue}) "
                                "allows; retry later, or raise max_queue or the nodes' max_sequences in the cluster file")
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
                await self._advance()
            else:
                await self.data_path.idle()
                if not self._pending or not self.serving:
                    await self._wake.wait()

    def _admit(self) -> None:
        while self._pending and len(self._active) < self.capacity:
            request = self._pending.popleft()
            if request.cancelled:
                continue
            if not self.serving:
                request.events.put_nowait(RequestFailed(FailureKind.UNAVAILABLE, self._unservable()))
                continue
            seq_id = self._new_sequence_id()
            seq = self.data_path.add(seq_id, request)
            request.admitted, request.admitted_at = True, time.perf_counter()
            request.sent_tokens = len(request.received)
            self._active[seq_id] = request
            if len(self._active) > 1:
                for sharing in self._active.values():
                    sharing.alone = False
            if self._nodes_timing:
                request.alone = False
            if seq.done:  # a resumed request whose end was lost on the way
                self._emit()

    def _new_sequence_id(self) -> int:
        """Growing with admission (the ring's nodes rely on it), from a random start by random steps, so that
        no caller can predict one."""
        self._last_id += 1 + secrets.randbelow(1 << 16)
        return self._last_id

    def _unservable(self) -> str:
        placement = self._placement_now()
        stage = next((s for s in range(self.config.n_stages) if s not in placement), 0)
        node = next(self.nodes[name] for name, stages in self.home.items() if stage in stages)
        return (f"no serving node can run stage {stage}: {node.describe()} is {node.state} and no other node holds "
                "that stage's graph; start the node (it registers by itself) and retry")

    async def _advance(self) -> None:
        try:
            failed = await self.data_path.advance(self._wake)
        except NodeFailure as failure:
            self._fail_all(failure)
            return
        for seq_id, message in failed:
            if seq_id in self._active:
                self._fail(seq_id, RequestFailed(FailureKind.INTERNAL, message))
        self._emit()

    # --- placement and failover ------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Make the placement match the serving nodes; replay every active sequence when it changes."""
        while True:
            serving = self._serving_nodes()
            if self.choose_homes is not None and frozenset(serving) != self._chosen[0]:
                await self._choose_homes(serving)
                continue  # nodes may have come or gone meanwhile
            placement = self._placement_now()
            stale = [name for name in serving if self.nodes[name].assigned != tuple(stages_of(placement, name))]
            if placement == self.placement and not stale:
                return
            if len(placement) < self.config.n_stages:
                self._lose_placement()
                return
            extras = self.data_path.assignment(placement)
            moves = await asyncio.gather(*(self.nodes[name].assign(self.incarnation, stages_of(placement, name), **extras)
                                           for name in serving), return_exceptions=True)
            if any(isinstance(result, BaseException) for result in moves):
                for result in moves:
                    if isinstance(result, BaseException):
                        log.warning("%s", result)
                continue  # a node failed on the way: place again without it
            previous, self.view.placement = self.placement, placement
            await self._replay(previous)
            return

    async def _choose_homes(self, serving: list[str]) -> None:
        self._chosen = (frozenset(serving), None)
        start = self._placement_now()
        if len(start) == self.config.n_stages:
            with self.timing_nodes():  # a choice starts by timing every serving node
                homes = await self.choose_homes([self.nodes[name] for name in serving], start)
            if self._chosen[0] == frozenset(serving):
                self._chosen = (frozenset(serving), homes)

    def _serving_nodes(self) -> list[str]:
        return [name for name, node in self.nodes.items() if node.state == NodeState.SERVING and name not in self.leaving]

    def unplaceable_without(self, name: str) -> int | None:
        """The first stage no serving node but `name` can run, None when every stage can move off it."""
        can_run = {other: node.can_run for other, node in self.nodes.items()}
        serving = [other for other in self._serving_nodes() if other != name]
        placement = place(self.home, can_run, serving, self.config.n_stages)
        return next((stage for stage in range(self.config.n_stages) if stage not in placement), None)

    def _placement_now(self) -> dict[int, str]:
        """Where the stages would run on the nodes serving now (some may be missing)."""
        can_run = {name: node.can_run for name, node in self.nodes.items()}
        return place(self._chosen[1] or self.home, can_run, self._serving_nodes(), self.config.n_stages)

    def _lose_placement(self) -> None:
        if self.placement:
            log.warning("the cluster cannot serve: %s", self._unservable())
        self.view.placement = {}
        self.data_path.forget()
        for seq_id in list(self._active):
            self._fail(seq_id, RequestFailed(FailureKind.UNAVAILABLE, self._unservable()))

    async def _replay(self, previous: dict[int, str]) -> None:
        """Every active sequence starts again on the new placement from its prompt and committed tokens."""
        await self.data_path.replay(self._active)
        for rates in self.alone_rates.values():
            rates.clear()  # they were the old placement's
        for request in self._active.values():
            request.alone = False
        if not previous:
            return
        moved = {stage: (previous.get(stage), name) for stage, name in self.placement.items()
                 if previous.get(stage) != name}
        lost = sorted({old for old, _ in moved.values() if old and self.nodes[old].state != NodeState.SERVING})
        tokens = sum(len(self.data_path.sequence(s).prefill) for s in self._active)
        what = ", ".join(f"stage {stage} {old} -> {new}" for stage, (old, new) in sorted(moved.items()))
        leaving = sorted({old for old, _ in moved.values() if old in self.leaving})
        moved_why = "placement: auto chose again" if self.choose_homes else "stages back home (a node registered)"
        event = (f"failover (lost {', '.join(lost)})" if lost else f"{', '.join(leaving)} draining" if leaving
                 else moved_why)
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
            seq = self.data_path.sequence(seq_id)
            new = seq.generated[request.sent_tokens :]
            if request.first_token_at is None and (new or seq.done):
                request.first_token_at = now
            if not (new or seq.done):
                continue  # nothing committed this tick: no text to decode
            self.metrics.tokens_committed(len(new))
            text = request.text.delta(seq.generated, final=seq.done)
            if new or text:
                request.events.put_nowait(TextChunk(tuple(new), text))
                request.sent_tokens, request.last_token_at = len(seq.generated), now
            if seq.done and self.data_path.settled(seq_id):
                self._finish(seq_id, request, now)

    def _finish(self, seq_id: int, request: Request, now: float) -> None:
        seq = self.data_path.sequence(seq_id)
        for boundary, (flips, checks) in enumerate(zip(seq.stats.flips, seq.stats.checks)):
            self.metrics.flips(boundary, flips, checks)
            self.flips_seen[boundary] += flips
            self.checks_seen[boundary] += checks
        result = GenerationResult(
            text=request.text.text(seq.generated), token_ids=seq.generated, stop_reason=seq.stop_reason,
            prompt_tokens=len(seq.prompt), time_to_first_token_ms=(request.first_token_at - request.admitted_at) * 1000,
            tokens_per_s=steady_rate(len(seq.generated) - len(request.received),
                                     (request.last_token_at or now) - request.first_token_at),
            speculative=seq.speculate, backend=NODE_BACKEND, provider=self._providers(), stats=SpeculationStats.of(seq))
        if request.alone and result.tokens_per_s > 0:
            self.alone_rates[seq.speculate].append(result.tokens_per_s)
        request.events.put_nowait(result)
        self._end(seq_id)

    def _providers(self) -> str:
        return ",".join(sorted({node.info.provider for node in self.nodes.values() if node.info is not None}))

    def _end(self, seq_id: int) -> None:
        """Forget a sequence here and free its caches on every node of the placement."""
        del self._active[seq_id]
        self.data_path.end(seq_id)

    def _fail(self, seq_id: int, failure: RequestFailed) -> None:
        self._active[seq_id].events.put_nowait(failure)
        self._end(seq_id)

    def _drop_cancelled(self) -> None:
        for seq_id, request in list(self._active.items()):
            if request.cancelled:
                self._end(seq_id)
        self._pending = deque(request for request in self._pending if not request.cancelled)

    def _fail_all(self, failure: NodeFailure) -> None:
        """A node refused a step, or a bug: the active requests fail and every node starts clean."""
        log.warning("%s (%d request(s) stopped)", failure, len(self._active))
        for seq_id in list(self._active):
            self._fail(seq_id, RequestFailed(failure.kind, str(failure)))
        self.data_path.forget()
        for node in self.nodes.values():
            node.assigned = None  # the next reconcile assigns every node again, which frees everything

    def _report(self) -> None:
        self.metrics.set_queue_depth(len(self._pending))
        self.metrics.set_active_requests(len(self._active))
        for name, node in self.nodes.items():
            self.metrics.set_sequences(name, self.sequences_on(name))
            self.metrics.node_state(name, node.state)
