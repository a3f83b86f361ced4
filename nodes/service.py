"""The Node gRPC service: step messages in, results out (the lockstep data path); or, once assigned a
placement, the ring data path, run by a RingWorker over direct links: the coordinator's, which opens and
closes sequences and takes the node's events, and those to and from the other nodes.

How a node is concurrent, in three sentences. Every ONNX Runtime call and every change to the node's
sequences runs on its one stage worker thread, fed by one inbox (nodes/stage_worker.py), so nothing else
touches the model and no lock is needed. The handlers here only check, translate and enqueue, on a gRPC
pool with a thread for every stream that can be open at once plus some for short calls (`SERVER_THREADS`),
so a stream never waits for a thread and Info always finds one; each direct link to the node, the
coordinator's included, is read by a thread of its own (nodes/link_listener.py). The stage worker writes to
the peers' links and the coordinator's itself, and a delay line sits in a path only where a link latency is
emulated."""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

from nodes.freed_memory import FreedMemory
from nodes.host import StageHost, StepRefused
from nodes.link_listener import LinkSession
from nodes.link_probe import LinkProbe
from nodes.node_metrics import NodeMetrics
from nodes.peer_links import Dialler, PeerLinks
from nodes.ring_worker import RingWorker
from nodes.stage_worker import StageWorker
from nodes.step_streams import StepStreams
from runtime.core.errors import SpeedError
from runtime.wire import options
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.framed_connection import FramedConnection
from runtime.wire.frames import frame
from runtime.wire.ring import messages_from_wire
from runtime.wire.security import caller, node_common_name

log = logging.getLogger("speed.node")
SHORT_CALL_THREADS = 4  # Info, Assign and health checks, beside the streams


STREAM_THREADS = 2  # the coordinator's Steps, twice over for an assignment's still ending
SERVER_THREADS = STREAM_THREADS + SHORT_CALL_THREADS  # a node's gRPC pool: a stream never waits for a thread


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with a sentence the coordinator knows came from this node, not from a broken connection."""
    context.set_trailing_metadata(options.origin("node"))
    context.abort(code, message)


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, host: StageHost, info: Callable[[], pb.NodeInfo], *, metrics: NodeMetrics,
                 emulated_link_ms: float = 0.0, only_caller: str | None = None, prefill_chunk: int = 64,
                 dial: Dialler,
                 drain: Callable[[], pb.DrainReply] | None = None, measure: Callable[[], None] | None = None):
        """only_caller: the one certificate name allowed to call (the coordinator's), in a secure cluster;
        dial: opens direct links to the other nodes, for the ring data path (nodes/peer_links.py) and to time
        them; drain: hands
        the node's stages over and stops it (SpeedError with a sentence when it cannot); measure: times its
        passes again, on the stage worker."""
        self.host = host
        self._drain = drain
        self._measure = measure
        self.prefill_chunk = prefill_chunk
        self._dial = dial
        self._ring: RingWorker | None = None
        self._ring_stamp = (0, 0)  # (incarnation, epoch) the ring worker serves
        self._ring_peers: set[str] = set()  # certificate names of the nodes allowed to forward to it
        self.only_caller = only_caller
        self.metrics = metrics
        metrics.set_max_sequences(host.max_sequences)
        metrics.set_hosting(len(host.stages))
        self._info = info
        self.worker = StageWorker(host.profile, name=host.name)
        self._link_delay_s = emulated_link_ms / 1000
        self._freed = FreedMemory()
        self._owner: str | None = None  # the connection (gRPC peer) of the coordinator that assigned the stages
        self.assign_key = secrets.token_hex(16)  # given only to the coordinator it registers with
        self.link_probe = LinkProbe(dial)  # round trips to the other nodes of its ring
        self.step_streams = StepStreams()  # closed when the node stops

    def _admit(self, context: grpc.ServicerContext) -> None:
        if self.only_caller is not None and caller(context) != self.only_caller:
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"node {self.host.name} serves only its cluster's "
                    f"coordinator, not {caller(context) or 'a caller without a certificate'}")

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        self._admit(context)
        return self._info()

    def Assign(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        self._admit(context)
        if not hmac.compare_digest(request.assign_key.encode(), self.assign_key.encode()):
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"node {self.host.name} takes its stages only from the "
                    "coordinator it registered with")
        try:
            self.worker.call(lambda: self._assign(request, context.peer()))
        except StepRefused as exc:
            _refuse(context, exc.code, str(exc))
        log.info("serving coordinator incarnation %d with stages %s", request.incarnation, list(self.host.stages))
        return self._info()

    def Measure(self, request: pb.MeasureRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        self._admit(context)
        if self._measure is not None:
            self.worker.call(self._measure)
        return self._info()

    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.DrainReply:
        own = node_common_name(self.host.name)
        if self.only_caller is not None and caller(context) != own:
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"only the holder of node {self.host.name}'s own "
                    f"certificate may drain it, not {caller(context) or 'a caller without a certificate'}")
        if self._drain is None:
            _refuse(context, grpc.StatusCode.UNIMPLEMENTED, f"node {self.host.name} cannot be drained")
        try:
            return self._drain()
        except SpeedError as exc:
            _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    def _assign(self, request: pb.AssignRequest, owner: str) -> None:
        self.host.assign(request.incarnation, request.stages)
        self._start_ring(request)
        self.metrics.set_hosting(len(self.host.stages))
        self.metrics.set_sequences(0)
        self._owner = owner

    def stop_ring(self, ring: RingWorker | None = None) -> None:
        """Stop the ring worker (only if it is still `ring`, when given): its streams end, its sequences go."""
        self.worker.call(lambda: self._stop_ring(ring))

    def _stop_ring(self, ring: RingWorker | None = None) -> None:
        if self._ring is not None and ring in (None, self._ring):
            self._ring.stop()
            self._ring = self.worker.ring = None

    def _start_ring(self, request: pb.AssignRequest) -> None:
        """With a placement, the stages run on the ring data path from now on; without, on lockstep steps. A
        standby node given no stage runs nothing until an assignment gives it one."""
        self._stop_ring()
        if not request.placement or not self.host.stages:
            return
        placement = {place.stage: place.node for place in request.placement}
        addresses = {place.node: place.link_address for place in request.placement if place.node != self.host.name}
        self.link_probe.measure(addresses)
        links = PeerLinks(addresses, self._dial, delay_s=self._link_delay_s,
                          incarnation=request.incarnation, epoch=request.epoch, profile=self.host.profile)
        self._ring = RingWorker(self.host.model, name=self.host.name, stages=self.host.stages, placement=placement,
                                links=links, max_sequences=self.host.max_sequences, prefill_chunk=self.prefill_chunk,
                                delay_s=self._link_delay_s, metrics=self.metrics, profile=self.host.profile,
                                worker=self.worker)
        self.worker.ring = self._ring
        self._ring_stamp = (request.incarnation, request.epoch)
        self._ring_peers = {node_common_name(name) for name in addresses}

    @property
    def open_sequences(self) -> int:
        ring = self._ring
        return ring.open_sequences if ring is not None else self.host.open_sequences

    def adopt(self, incarnation: int) -> None:
        """The coordinator announced its incarnation at registration."""
        self.worker.call(lambda: self._adopt(incarnation))

    def _adopt(self, incarnation: int) -> None:
        if incarnation > self.host.incarnation:
            self._stop_ring()
        self.host.adopt(incarnation)
        self.metrics.set_hosting(len(self.host.stages))
        self.metrics.set_sequences(self.host.open_sequences)

    def Steps(self, requests: Iterator[pb.StepBatch], context: grpc.ServicerContext) -> Iterator[pb.StepResults]:
        self._admit(context)
        for batch in self.step_streams.messages(requests, context):
            if self._owner is not None and context.peer() != self._owner:  # checked per message: Assign may come later
                _refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"node {self.host.name} takes step messages only "
                        "on the connection of the coordinator that assigned its stages")
            self._emulate_link()
            refusal = None
            try:
                results = self.worker.call(lambda batch=batch: self._step(batch))
            except StepRefused as exc:
                refusal = exc.code, str(exc)
            except Exception as exc:  # a bug: the caller gets a sentence, the node keeps serving others
                log.exception("a step failed")
                refusal = grpc.StatusCode.INTERNAL, f"node {self.host.name} failed to run a step: {exc!r}"
            if refusal is not None:
                self.metrics.refused(refusal[0].name)
                batch = None  # nothing holds the refused message or what its checks decoded any more
                self._freed.release_soon()
                _refuse(context, *refusal)
            self._emulate_link()
            yield results

    def _step(self, batch: pb.StepBatch) -> pb.StepResults:
        started = time.perf_counter()
        try:
            results = self.host.step(batch)
        finally:
            self.metrics.set_sequences(self.host.open_sequences)
        self.metrics.step(time.perf_counter() - started, sum(item.length for item in batch.items))
        return results

    def open_link(self, hello: pb.LinkHello, certificate: str, connection: FramedConnection) -> LinkSession | str:
        """A direct link whose hello carried the cluster's secret: the coordinator's for the ring's control, or
        another node's with forwarded states; the sentence refusing it where the node does not take it."""
        if hello.probe:
            return self._admit_probe(certificate) or LinkSession(take=lambda payload: self._echo(connection, payload))
        if not hello.HasField("ring"):
            return self.admit_link(certificate) or LinkSession(take=self.take_forwarded)
        if self.only_caller is not None and certificate != self.only_caller:
            return (f"node {self.host.name} takes the ring's control only from its cluster's coordinator, not "
                    f"{certificate or 'a caller without a certificate'}")
        if not hmac.compare_digest(hello.ring.assign_key.encode(), self.assign_key.encode()):
            return f"node {self.host.name} takes the ring's control only from the coordinator it registered with"
        return self.worker.call(lambda: self._attach_coordinator(hello.ring, connection))

    def _attach_coordinator(self, binding: pb.RingBinding, connection: FramedConnection) -> LinkSession | str:
        ring, stamp = self._ring, (binding.incarnation, binding.epoch)
        if ring is None or stamp != self._ring_stamp:
            return (f"node {self.host.name} runs the ring data path only for the placement its coordinator assigned "
                    "last")
        if not ring.attach(connection):
            return f"node {self.host.name} already has its coordinator's link for this placement"
        return LinkSession(take=lambda payload: self._take_control(ring, stamp, payload),
                           ended=lambda: self.stop_ring(ring),  # the coordinator went: nobody reads its commits
                           refusal=lambda sentence: frame(pb.RingEvents(refusal=sentence).SerializeToString()))

    def admit_link(self, certificate: str) -> str:
        """Whether another node's link may bring it forwarded states ("" if so, else why not): in a secure cluster,
        only from the nodes of its placement (the link's certificate names the node); its secret is checked before."""
        if self.only_caller is not None and certificate not in self._ring_peers:
            return (f"node {self.host.name} takes forwarded states only from the nodes of its placement, not "
                    f"{certificate or 'a caller without a certificate'}")
        return ""

    def _admit_probe(self, certificate: str) -> str:
        """A node timing its link to this one: in a secure cluster, any node's certificate (the echo tells nothing,
        and the other nodes may probe before this one has taken the same placement)."""
        if self.only_caller is not None and not certificate.startswith(node_common_name("")):
            return (f"node {self.host.name} echoes probes only for the nodes of its cluster, not "
                    f"{certificate or 'a caller without a certificate'}")
        return ""

    @staticmethod
    def _echo(connection: FramedConnection, payload: bytes) -> str:
        connection.send(frame(payload))
        return ""

    def _take_control(self, ring: RingWorker, stamp: tuple[int, int], payload: bytes) -> str:
        try:
            control = pb.RingControl.FromString(payload)
        except DecodeError:
            self.metrics.refused(grpc.StatusCode.INVALID_ARGUMENT.name)
            return f"node {self.host.name} cannot read a ring control message"
        if (control.incarnation, control.epoch) == stamp:
            ring.control(control)
        return ""

    def take_forwarded(self, payload: bytes) -> str:
        """A Forwarded message from a direct link, to the ring it is for ("" once taken, else why it is refused).
        Checked whatever its epoch, so that no answer tells which epoch is the live one."""
        cfg = self.host.cfg
        try:
            with self.host.profile.timed("serialize"):
                message = pb.Forwarded.FromString(payload)
                messages = messages_from_wire(message, d_model=cfg.d_model, vocab_size=cfg.vocab_size,
                                              context_length=cfg.context_length)
        except (DecodeError, SpeedError) as exc:
            self.metrics.refused(grpc.StatusCode.INVALID_ARGUMENT.name)
            return str(exc) if isinstance(exc, SpeedError) else f"node {self.host.name} cannot read a forwarded message"
        ring = self._ring
        if ring is not None and (message.incarnation, message.epoch) == self._ring_stamp:
            ring.deliver(messages)  # else from before the last assignment: what it carries is void
        return ""

    def _emulate_link(self) -> None:
        """EMULATION for benchmarks: the one-way latency of a slow link, paid by each step message."""
        if self._link_delay_s:
            time.sleep(self._link_delay_s)

    def expire_idle(self) -> list[int]:
        def expire() -> list[int]:
            expired = self.host.expire_idle()
            self.metrics.set_sequences(self.host.open_sequences)
            return expired

        return self.worker.call(expire)
