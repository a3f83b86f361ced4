"""The coordinator's link to one node: its registration state, its stream of step messages, and its ring links."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc

from runtime.coordinator.ring_link import RingDialler, RingLink
from runtime.core.cluster_file import NodeSpec, on_host_of
from runtime.core.errors import SpeedError
from runtime.core.node_state import NodeState
from runtime.core.request import FailureKind
from runtime.wire import options
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc

log = logging.getLogger("speed.coordinator")

# the largest values a node may report (in its heartbeats and its own measurements) that are stored and shown
MAX_STEP_MS = 3_600_000.0  # a batch or a pass: an hour is already absurd
MAX_POSITIONS_PER_S = 1e9
MAX_MEMORY_BYTES = 2**60
MAX_CORES = 1 << 16
MAX_MACHINE_ID_CHARS = 128


def measurement_problem(info: pb.NodeInfo) -> str:
    """What is out of range in a node's timing of itself, "" when nothing."""
    measured = [("head_ms", info.head_ms)] + [(f"pass_times[{i}].ms", p.ms) for i, p in enumerate(info.pass_times)]
    for field, value in measured:
        if not 0 <= value <= MAX_STEP_MS:  # also NaN
            return f"{field} {value}, not 0 to {MAX_STEP_MS:g}"
    for field, value in (("machine.cores", info.machine.cores), ("cores_used", info.cores_used)):
        if not 0 <= value <= MAX_CORES:
            return f"{field} {value}, not 0 to {MAX_CORES}"
    if len(info.machine.id) > MAX_MACHINE_ID_CHARS:
        return f"machine.id of {len(info.machine.id)} characters, more than {MAX_MACHINE_ID_CHARS}"
    return ""


async def time_passes_again(nodes: Sequence[RemoteNode], timeout_s: float) -> None:
    """Have each node time its passes again (RemoteNode.measure): the nodes of one machine one after another, so
    that none slows another's figures, and the machines side by side. Nodes that did not say which machine they
    run on are timed as if they shared one."""
    machines: dict[str, list[RemoteNode]] = {}
    for node in nodes:
        machines.setdefault(node.info.machine.id if node.info else "", []).append(node)

    async def in_turn(machine: list[RemoteNode]) -> None:
        for node in machine:
            await node.measure(timeout_s)

    await asyncio.gather(*(in_turn(machine) for machine in machines.values()))


class NodeFailure(Exception):
    """A node refused a step: a coordinator bug, so the requests of that tick cannot go on."""

    def __init__(self, message: str, kind: FailureKind = FailureKind.INTERNAL):
        super().__init__(message)
        self.kind = kind


class NodeLost(NodeFailure):
    """A node stopped answering (or registered again): its stages move and the requests are replayed."""

    def __init__(self, message: str):
        super().__init__(message, FailureKind.UNAVAILABLE)


class RemoteNode:
    def __init__(self, spec: NodeSpec, *, step_timeout_s: float,
                 on_state_change: Callable[[], Awaitable[None]] | None = None, metadata: tuple = ()):
        """metadata: what every call to the node carries (the cluster's secret)."""
        self.spec = spec
        self._metadata = metadata
        self.step_timeout_s = step_timeout_s
        self.on_state_change = on_state_change  # e.g. to keep the health service true at once
        self.state = NodeState.WAITING
        self.info: pb.NodeInfo | None = None
        self.address = spec.address
        self.last_heartbeat: float | None = None
        self._assign_key = ""  # what the node gave at registration; it takes an Assign only with it
        self.assigned: tuple[int, ...] | None = None  # the stages it was told to run on this connection
        self.held = 0  # sequences it reported holding at its last heartbeat
        self.step_ms = 0.0  # its mean batch time over the last seconds, at its last heartbeat
        self.positions_per_s = 0.0  # positions its batches processed per second, at its last heartbeat
        self.memory_available_bytes = 0  # free memory on its machine, at its registration or last heartbeat
        self.links: list[pb.LinkTime] = []  # its round trips to the other nodes of its ring, at its last heartbeat
        self._channel: grpc.aio.Channel | None = None
        self._stream = None

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self) -> str:
        return f"node {self.name} ({self.address})"

    @property
    def can_run(self) -> frozenset[int]:
        """The stages whose graphs it holds: its own and its standby stages."""
        return frozenset(self.info.stages) | frozenset(self.info.standby_stages) if self.info else frozenset()

    def place(self, stage: int) -> pb.StagePlace:
        """Where the ring finds `stage` when this node runs it: its gRPC address and that of its direct links."""
        return pb.StagePlace(stage=stage, node=self.name, address=self.address, link_address=self.link_address)

    @property
    def link_address(self) -> str:
        """Where it takes direct links: on the same host as the address it registered from."""
        return on_host_of(self.address, self.info.link_port if self.info else 0)

    @property
    def max_sequences(self) -> int:
        return self.info.max_sequences if self.info else self.spec.max_sequences

    async def connect(self, info: pb.NodeInfo, address: str, channel: grpc.aio.Channel, assign_key: str) -> None:
        """Open a fresh step stream, on `channel`, to a node that has just registered with `assign_key`."""
        await self.disconnect(NodeState.WAITING)
        self.info, self.address, self.held = info, address, info.open_sequences
        self.memory_available_bytes, self.links = info.memory_available_bytes, list(info.links)
        self._assign_key = assign_key
        self._channel = channel
        self._stream = pb_grpc.NodeStub(self._channel).Steps(metadata=self._metadata)
        self.last_heartbeat = time.monotonic()
        self.state = NodeState.SERVING
        await self._changed()

    async def disconnect(self, state: NodeState = NodeState.DOWN) -> None:
        self.state = state
        self.assigned = None
        self.step_ms = self.positions_per_s = 0.0
        stream, channel, self._stream, self._channel = self._stream, self._channel, None, None
        if stream is not None:
            stream.cancel()
        if channel is not None:
            await channel.close()
        await self._changed()

    async def _changed(self) -> None:
        if self.on_state_change is not None:
            await self.on_state_change()

    async def assign(self, incarnation: int, stages: list[int], *, placement: list[pb.StagePlace] = (),
                     epoch: int = 0) -> None:
        """Tell the node which stages it runs for this coordinator; it frees every sequence it held. With a
        placement (where every stage runs), its stages run on the ring data path."""
        stream = self._stream
        if stream is None:
            raise NodeLost(f"{self.describe()} is {self.state}")
        try:
            info = await pb_grpc.NodeStub(self._channel).Assign(
                pb.AssignRequest(incarnation=incarnation, stages=stages, placement=placement, epoch=epoch,
                                 assign_key=self._assign_key),
                timeout=self.step_timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:  # whatever the reason, it cannot run stages for us now
            raise await self.lost(stream, f"did not take stages {stages} ({exc.code().name}: {exc.details()})") from None
        if self._stream is stream:
            self.assigned, self.held = tuple(stages), info.open_sequences

    async def measure(self, timeout_s: float) -> None:
        """Have the node time its passes again; its registration's figures stay when it cannot."""
        channel = self._channel
        if channel is None:
            return
        # The call is a task of its own: the channel closing under it (the node went) cancels only the call,
        # while a cancellation of ours (the coordinator stopping) must reach the caller, whatever the channel did.
        call = asyncio.ensure_future(
            pb_grpc.NodeStub(channel).Measure(pb.MeasureRequest(), timeout=timeout_s, metadata=self._metadata))
        try:
            await asyncio.wait([call])
        finally:
            call.cancel()
        if call.cancelled():
            log.info("%s went while it timed its passes", self.describe())
            return
        try:
            info = call.result()
        except grpc.aio.AioRpcError as exc:
            log.warning("%s did not time its passes again (%s); its earlier figures stay", self.describe(),
                        exc.code().name)
            return
        problem = measurement_problem(info)
        if problem or self.info is None:
            log.warning("%s timed its passes with %s; its earlier figures stay", self.describe(), problem)
            return
        del self.info.pass_times[:]
        self.info.pass_times.extend(info.pass_times)
        self.info.head_ms = info.head_ms

    def reassign_later(self) -> None:
        """A step was lost on the way, with whatever opens and closes it carried: what the node holds is no
        longer known, so its stages are assigned again (which frees them) before its next step."""
        self.assigned = None

    async def step(self, batch: pb.StepBatch) -> pb.StepResults:
        """Send one step message and wait for its results, at most step_timeout_s."""
        stream = self._stream
        if stream is None or self.assigned is None:
            raise NodeLost(f"{self.describe()} is {self.state if stream is None else 'not assigned its stages yet'}")
        try:
            return await asyncio.wait_for(self._exchange(stream, batch), self.step_timeout_s)
        except asyncio.InvalidStateError:  # the stream had already ended: the node is gone
            raise await self.lost(stream, "closed its step stream") from None
        except asyncio.TimeoutError:
            raise await self.lost(stream, f"did not answer a step within {self.step_timeout_s:g} s") from None
        except grpc.aio.AioRpcError as exc:
            if not options.sent_by(exc, "node"):  # the connection broke, whatever gRPC calls it
                raise await self.lost(stream, f"stopped answering ({exc.code().name})") from None
            # the node refused a step: a coordinator bug, not a dead node; a new stream serves the next requests
            if self._stream is stream:
                self._stream = pb_grpc.NodeStub(self._channel).Steps(metadata=self._metadata)
            raise NodeFailure(f"{self.describe()} refused a step: {exc.details()}") from None

    async def open_ring(self, dial: RingDialler, incarnation: int, epoch: int) -> tuple[object, RingLink]:
        """A new ring link (the ring data path's control and events) to a node assigned the placement `epoch`,
        with its step stream of now (for `lost`)."""
        stream = self._stream
        if stream is None or self.assigned is None:
            raise NodeLost(f"{self.describe()} is {self.state if stream is None else 'not assigned its stages yet'}")
        link_address = self.link_address
        try:
            return stream, await dial.open(self.name, link_address, pb.RingBinding(
                incarnation=incarnation, epoch=epoch, assign_key=self._assign_key))
        except SpeedError as exc:
            raise NodeLost(f"{self.describe()} refused the ring's link: {exc}") from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise NodeLost(f"{self.describe()} cannot be reached on its link port ({link_address}: "
                           f"{str(exc) or type(exc).__name__}); where a firewall stands between the coordinator and "
                           "the node, let that port through, or fix it with link_port in the cluster file") from None

    async def lost(self, stream, what: str) -> NodeLost:
        """Mark the node down, unless it has registered again since `stream` (its step stream, as ring()
        also gives it) was opened."""
        if self._stream is stream:
            await self.disconnect()
        return NodeLost(f"{self.describe()} {what}")

    @staticmethod
    async def _exchange(stream, batch: pb.StepBatch) -> pb.StepResults:
        await stream.write(batch)
        reply = await stream.read()
        if reply is grpc.aio.EOF:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                      "the node closed the stream")
        return reply
