"""The Node gRPC service: step messages in, results out, one at a time per node."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from nodes.freed_memory import FreedMemory
from nodes.host import StageHost, StepRefused
from nodes.node_metrics import NodeMetrics
from runtime.wire import options
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.security import caller

log = logging.getLogger("speed.node")

def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with a sentence the coordinator knows came from this node, not from a broken connection."""
    context.set_trailing_metadata(options.origin("node"))
    context.abort(code, message)


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, host: StageHost, info: Callable[[], pb.NodeInfo], *, metrics: NodeMetrics,
                 emulated_link_ms: float = 0.0, only_caller: str | None = None):
        """only_caller: the one certificate name allowed to call (the coordinator's), in a secure cluster."""
        self.host = host
        self.only_caller = only_caller
        self.metrics = metrics
        metrics.set_max_sequences(host.max_sequences)
        metrics.set_hosting(len(host.stages))
        self._info = info
        self._lock = threading.Lock()  # one ONNX Runtime call at a time; its own threads do the parallel work
        self._link_delay_s = emulated_link_ms / 1000
        self._freed = FreedMemory()
        self._owner: str | None = None  # the connection (gRPC peer) of the coordinator that assigned the stages

    def _admit(self, context: grpc.ServicerContext) -> None:
        if self.only_caller is not None and caller(context) != self.only_caller:
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"node {self.host.name} serves only its cluster's "
                    f"coordinator, not {caller(context) or 'a caller without a certificate'}")

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        self._admit(context)
        return self._info()

    def Assign(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        self._admit(context)
        with self._lock:
            try:
                self.host.assign(request.incarnation, request.stages)
            except StepRefused as exc:
                _refuse(context, exc.code, str(exc))
            self.metrics.set_hosting(len(self.host.stages))
            self.metrics.set_sequences(0)
            self._owner = context.peer()
        log.info("serving coordinator incarnation %d with stages %s", request.incarnation, list(self.host.stages))
        return self._info()

    def adopt(self, incarnation: int) -> None:
        """The coordinator announced its incarnation at registration."""
        with self._lock:
            self.host.adopt(incarnation)
            self.metrics.set_hosting(len(self.host.stages))
            self.metrics.set_sequences(self.host.open_sequences)

    def Steps(self, requests: Iterator[pb.StepBatch], context: grpc.ServicerContext) -> Iterator[pb.StepResults]:
        self._admit(context)
        for batch in requests:
            if self._owner is not None and context.peer() != self._owner:  # checked per message: Assign may come later
                _refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"node {self.host.name} takes step messages only "
                        "on the connection of the coordinator that assigned its stages")
            self._emulate_link()
            refusal = None
            with self._lock:
                started = time.perf_counter()
                try:
                    results = self.host.step(batch)
                except StepRefused as exc:
                    refusal = exc.code, str(exc)
                except Exception as exc:  # a bug: the caller gets a sentence, the node keeps serving others
                    log.exception("a step failed")
                    refusal = grpc.StatusCode.INTERNAL, f"node {self.host.name} failed to run a step: {exc!r}"
                finally:
                    self.metrics.set_sequences(self.host.open_sequences)
                if refusal is None:
                    self.metrics.step(time.perf_counter() - started)
            if refusal is not None:
                self.metrics.refused(refusal[0].name)
                batch = None  # nothing holds the refused message or what its checks decoded any more
                self._freed.release_soon()
                _refuse(context, *refusal)
            self._emulate_link()
            yield results

    def _emulate_link(self) -> None:
        """EMULATION for benchmarks: the one-way latency of a slow link, paid by each step message."""
        if self._link_delay_s:
            time.sleep(self._link_delay_s)

    def expire_idle(self) -> list[int]:
        with self._lock:
            expired = self.host.expire_idle()
            self.metrics.set_sequences(self.host.open_sequences)
            return expired
