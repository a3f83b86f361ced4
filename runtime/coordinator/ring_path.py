"""The ring data path, coordinator side: nodes hand hidden states to each other and settle guesses among
themselves; the coordinator opens and closes sequences on a direct link to each node (ring_link.py) and
takes the committed tokens from the node of the last stage. It keeps admission, prompts, failover and the
authority over what is committed (the ledger): a replay reopens every sequence with its prompt and the
tokens committed so far.

A placement is numbered (its epoch): every node drops ring messages of other epochs, so nothing from
before a failover touches what comes after. A sequence that stops committing for stall_timeout_s (a
link lost messages) makes every node be assigned again, which replays it like a failover.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from runtime.coordinator.cluster_view import ClusterView
from runtime.coordinator.remote_node import NodeLost
from runtime.coordinator.requests import Request
from runtime.coordinator.ring_link import RingDialler, RingLink
from runtime.core.errors import SpeedError
from runtime.core.limits import cache_capacity
from runtime.core.ring import RingError
from runtime.core.ring_ledger import RingLedger
from runtime.core.scheduler import SequenceState
from runtime.wire import speed_pb2 as pb
from runtime.wire.sampling import sampling_to_wire

log = logging.getLogger("speed.coordinator")


class RingPath:
    def __init__(self, view: ClusterView, *, stall_timeout_s: float, dial: RingDialler):
        self.view = view
        self._dial = dial
        self.stall_timeout_s = stall_timeout_s
        self.ledger = RingLedger(view.config.n_stages)
        self._epochs = itertools.count(1)
        self.epoch = 0
        self._links: dict[str, tuple[object, RingLink]] = {}  # node -> (its step stream, its ring link)
        self._readers: list[asyncio.Task] = []
        self._events: asyncio.Queue = asyncio.Queue()  # (epoch, node, RingEvents or the exception that ended it)
        self._control: dict[str, pb.RingControl] = {}  # waiting to be written, per node
        self._closing: dict[int, tuple[set[str], float]] = {}  # finished sequences: nodes yet to report, since
        self._failed: list[tuple[int, str]] = []
        self._last_progress = time.monotonic()

    def sequence(self, seq_id: int) -> SequenceState:
        return self.ledger.sequences[seq_id]

    # --- placement -------------------------------------------------------------------------------

    def assignment(self, placement: dict[int, str]) -> dict:
        """What Assign tells each node besides its stages: where every stage runs, under a new epoch."""
        self.epoch = next(self._epochs)
        nodes = self.view.nodes
        return dict(placement=[nodes[name].place(stage) for stage, name in sorted(placement.items())], epoch=self.epoch)

    async def replay(self, active: dict[int, Request]) -> None:
        """The nodes were assigned the new placement (which freed everything): open a ring link to each
        and every active sequence again from its prompt and committed tokens."""
        self.forget()
        names = sorted(set(self.view.placement.values()))
        opened = await asyncio.gather(*(self.view.nodes[name].open_ring(self._dial, self.view.incarnation, self.epoch)
                                        for name in names), return_exceptions=True)
        for name, link in zip(names, opened):
            if isinstance(link, NodeLost):
                log.warning("%s", link)
                self.view.nodes[name].reassign_later()
                continue
            if isinstance(link, BaseException):
                raise link
            self._links[name] = link
            self._readers.append(asyncio.ensure_future(self._read(self.epoch, name, link[1])))
        for seq_id, request in active.items():
            self.ledger.rewind(seq_id)
            self._open(seq_id, request)
        self._last_progress = time.monotonic()

    def forget(self) -> None:
        """The placement is gone: close the links; what was on the way is void."""
        for _, link in self._links.values():
            link.close()
        for reader in self._readers:
            reader.cancel()
        self._links, self._readers, self._control = {}, [], {}
        for seq_id in self._closing:
            self._closing[seq_id] = (set(), 0.0)  # no node will report on it any more

    async def _read(self, epoch: int, name: str, link: RingLink) -> None:
        try:
            async for events in link.events():
                self._events.put_nowait((epoch, name, events))
            ended: Exception = ConnectionError("closed")
        except (OSError, SpeedError) as exc:
            ended = exc
        self._events.put_nowait((epoch, name, ended))

    # --- sequences -------------------------------------------------------------------------------

    def add(self, seq_id: int, request: Request) -> SequenceState:
        if all(seq.done for seq in self.ledger.sequences.values()):
            self._last_progress = time.monotonic()  # the clock of a stall starts with the first sequence
        seq = self.ledger.add(seq_id, request.prompt_ids, **self.view.sequence_options(request))
        if not seq.done:
            self._open(seq_id, request)
        return seq

    def _open(self, seq_id: int, request: Request) -> None:
        seq = self.ledger.sequences[seq_id]
        config = self.view.config
        opened = pb.RingOpen(
            sequence=pb.OpenSequence(seq_id=seq_id, sampling=sampling_to_wire(request.options.sampling),
                                     capacity=cache_capacity(config, len(request.prompt_ids),
                                                             request.options.max_new_tokens),
                                     plain_guesses=request.options.plain_guesses),
            prefill=seq.prefill, last_position=seq.last_position, window=request.window if seq.speculate else 0,
            guess_thresholds=request.guess_thresholds, prompt_tokens=len(seq.prompt))
        for name in self._links:
            self._control_for(name).opens.append(opened)

    def _control_for(self, name: str) -> pb.RingControl:
        if name not in self._control:
            self._control[name] = pb.RingControl(incarnation=self.view.incarnation, epoch=self.epoch)
        return self._control[name]

    def settled(self, seq_id: int) -> bool:
        """A finished sequence is closed on every node, which report its counts; True once they all have
        (or stall_timeout_s has passed, or the placement changed)."""
        if seq_id not in self._closing:
            self._close(seq_id)
            self._closing[seq_id] = (set(self._links), time.monotonic())
        waiting, since = self._closing[seq_id]
        return not waiting or time.monotonic() - since > self.stall_timeout_s

    def end(self, seq_id: int) -> None:
        if seq_id not in self._closing:
            self._close(seq_id)  # cancelled or failed before it finished
        self._closing.pop(seq_id, None)
        self.ledger.remove(seq_id)

    def _close(self, seq_id: int) -> None:
        for name in self._links:
            self._control_for(name).closes.append(seq_id)

    # --- the loop --------------------------------------------------------------------------------

    async def advance(self, wake: asyncio.Event) -> list[tuple[int, str]]:
        """Send what waits, then wait for the nodes' events (or a wake-up) and apply them. Returns the
        sequences a node could not run, with its reason."""
        await self._flush()
        arrived = []
        if self._events.empty():
            getter, woken = asyncio.ensure_future(self._events.get()), asyncio.ensure_future(wake.wait())
            done, pending = await asyncio.wait({getter, woken}, timeout=self._wait_s(),
                                               return_when=asyncio.FIRST_COMPLETED)
            for future in pending:
                future.cancel()
            if getter in done:
                arrived.append(getter.result())
        while not self._events.empty():
            arrived.append(self._events.get_nowait())
        for event in arrived:
            await self._apply(*event)
        self._check_progress()
        failed, self._failed = self._failed, []
        return failed

    def _wait_s(self) -> float:
        waiting = [since for _, (nodes, since) in self._closing.items() if nodes]
        deadline = min([self._last_progress, *waiting]) + self.stall_timeout_s
        return max(0.001, deadline - time.monotonic())

    async def _flush(self) -> None:
        control, self._control = self._control, {}
        for name, message in control.items():
            step_stream, link = self._links[name]
            try:
                link.send(message)
            except ConnectionError:
                await self._lose(name, step_stream, "closed its ring link")

    async def _apply(self, epoch: int, name: str, events) -> None:
        if epoch != self.epoch:
            return  # from before the placement changed
        if isinstance(events, Exception):
            await self._lose(name, self._links.get(name, (None, None))[0],
                             f"ended its ring link ({str(events) or type(events).__name__})")
            return
        for commit in events.commits:
            try:
                if self.ledger.commit(commit.seq_id, commit.position, commit.token):
                    self._last_progress = time.monotonic()
            except RingError as exc:
                log.warning("node %s: %s; every sequence is replayed", name, exc)
                self._doubt_all()
        for stats in events.closed:
            self._record(name, stats)
        for failure in events.failed:
            self._failed.append((failure.seq_id, f"node {name}: {failure.message}"))

    def _record(self, name: str, stats: pb.RingSequenceStats) -> None:
        closing = self._closing.get(stats.seq_id)
        seq = self.ledger.sequences.get(stats.seq_id)
        if closing is None or seq is None:
            return
        closing[0].discard(name)
        needed = len(seq.prompt) + len(seq.generated) - 1  # positions every stage runs for this text
        for stage in stats.stages:
            if stage.stage > 0:
                seq.stats.flips[stage.stage - 1] += stage.flips
                seq.stats.checks[stage.stage - 1] += stage.checks
            seq.stats.item_steps += stage.runs
            seq.stats.flushed_steps += max(0, stage.positions - needed)
        seq.stats.held_guesses += stats.held_guesses

    def _check_progress(self) -> None:
        decoding = any(not seq.done for seq in self.ledger.sequences.values())
        if decoding and time.monotonic() - self._last_progress > self.stall_timeout_s:
            waiting = ", ".join(f"{seq.seq_id} at position {len(seq.prompt) + len(seq.generated)}"
                                for seq in self.ledger.sequences.values() if not seq.done)
            log.warning("no token committed for %g s on the ring (waiting: %s): every sequence is replayed",
                        self.stall_timeout_s, waiting)
            self._doubt_all()
            self._last_progress = time.monotonic()

    def _doubt_all(self) -> None:
        for name in self._links:
            self.view.nodes[name].reassign_later()

    async def _lose(self, name: str, step_stream, what: str) -> None:
        if step_stream is not None:
            log.warning("%s", await self.view.nodes[name].lost(step_stream, what))
        self._doubt_all()  # the next reconcile places the stages again and replays

    async def idle(self) -> None:
        await self._flush()

