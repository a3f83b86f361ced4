"""The Node gRPC service: step messages in, results out, one at a time per node."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from nodes.host import StageHost, StepRefused
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc

log = logging.getLogger("speed.node")


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, host: StageHost, info: Callable[[], pb.NodeInfo], *, emulated_link_ms: float = 0.0):
        self.host = host
        self._info = info
        self._lock = threading.Lock()  # one ONNX Runtime call at a time; its own threads do the parallel work
        self._link_delay_s = emulated_link_ms / 1000

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        return self._info()

    def Steps(self, requests: Iterator[pb.StepBatch], context: grpc.ServicerContext) -> Iterator[pb.StepResults]:
        for batch in requests:
            self._emulate_link()
            with self._lock:
                try:
                    results = self.host.step(batch)
                except StepRefused as exc:
                    context.abort(exc.code, str(exc))
                except Exception as exc:  # a bug: the caller gets a sentence, the node keeps serving others
                    log.exception("a step failed")
                    context.abort(grpc.StatusCode.INTERNAL, f"node {self.host.name} failed to run a step: {exc!r}")
            self._emulate_link()
            yield results

    def _emulate_link(self) -> None:
        """EMULATION for benchmarks: the one-way latency of a slow link, paid by each step message."""
        if self._link_delay_s:
            time.sleep(self._link_delay_s)

    def expire_idle(self) -> list[int]:
        with self._lock:
            return self.host.expire_idle()
