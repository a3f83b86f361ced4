"""The Node gRPC service: step messages in, results out, one at a time per node."""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from nodes.host import StageHost, StepRefused
from nodes.node_metrics import NodeMetrics
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.security import caller

log = logging.getLogger("speed.node")

TRIM_DELAY_S = 0.5  # a burst of refused messages costs one trim
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_BYTES = 1024 * 1024  # blocks this large are mapped on their own and unmapped when freed
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024  # free memory this large at the top of a heap goes back at once


class FreedMemory:
    """Gives the memory a refused message used back to the operating system, soon after.

    A message is parsed in whichever of gRPC's threads received it. By default glibc raises its mmap
    threshold to the size of any large block freed (up to 32 MB, the trim threshold to twice that), so
    later buffers of big messages are carved out of the receiving thread's heap and stay resident once
    freed; malloc_trim does not shrink the top of those heaps. Measured on the demo model, 30 malformed
    step messages (up to 60 MB each) to one node, resident memory for good after them: +205 MB before
    any bound (575 MB at the peak), +49 to +84 MB with the node's count bounds and malloc_trim, -1 to
    +3 MB with fixed thresholds as well. malloc_trim takes 10-60 ms, so it runs once per burst of
    refusals, on a timer, not once per message. The thresholds are set for the whole process (a node's)."""

    def __init__(self, delay_s: float = TRIM_DELAY_S):
        self._delay_s = delay_s
        self._lock = threading.Lock()
        self._pending = False
        try:
            libc = ctypes.CDLL(None)
            self._trim = libc.malloc_trim  # glibc only; elsewhere nothing to do
            self._trim.argtypes, self._trim.restype = [ctypes.c_size_t], ctypes.c_int
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)  # fixed: no longer raised by what is freed
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        except (OSError, AttributeError):
            self._trim = None

    def release_soon(self) -> None:
        if self._trim is None:
            return
        with self._lock:
            if self._pending:
                return
            self._pending = True
        timer = threading.Timer(self._delay_s, self._release)
        timer.daemon = True
        timer.start()

    def _release(self) -> None:
        with self._lock:
            self._pending = False
        self._trim(0)


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
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {self.host.name} serves only its cluster's "
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
                context.abort(exc.code, str(exc))
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
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {self.host.name} takes step messages only on "
                              "the connection of the coordinator that assigned its stages")
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
                context.abort(*refusal)
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
