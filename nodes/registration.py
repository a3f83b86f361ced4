"""A node daemon's side of the registry: register with the coordinator, then heartbeat.

The coordinator may start after the node or restart at any time; the node keeps retrying with
backoff and registers again when a heartbeat finds itself forgotten, so nodes never need a restart.
Each heartbeat carries the sequences the node holds and its recent load (mean batch time, positions
per second), which `speed status` shows. A draining node asks the coordinator to move its stages away
(Leave) and then registers no more.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from runtime.core.errors import SpeedError
from runtime.core.recent_rate import RecentRate
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.security import open_channel

log = logging.getLogger("speed.node")

CALL_TIMEOUT_S = 2.0
MAX_BACKOFF_S = 5.0


class Registration(threading.Thread):
    def __init__(self, coordinator_address: str, address: str, info: Callable[[], pb.NodeInfo],
                 *, on_registered: Callable[[int], None], on_refused: Callable[[str], None],
                 recent: RecentRate | None = None, credentials: grpc.ChannelCredentials | None = None,
                 secret: str | None = None, assign_key: str = ""):
        """secret: the cluster's, carried by every call; assign_key: given with every registration, so only
        the coordinator registered with can assign the node's stages."""
        super().__init__(name="registration", daemon=True)
        self.coordinator_address = coordinator_address
        self.address = address
        self.info = info
        self.on_registered = on_registered  # with the coordinator's incarnation
        self.on_refused = on_refused  # the coordinator will never accept this node: a person must act
        self.recent = recent if recent is not None else RecentRate()  # the node's batches, for its heartbeats
        self.credentials = credentials  # TLS with the node's certificate, in a secure cluster
        self.secret = secret
        self.assign_key = assign_key
        self.stopping = threading.Event()
        self.registered = threading.Event()
        self.leaving = threading.Event()  # draining: it beats on, but never registers again

    def run(self) -> None:
        with open_channel(self.coordinator_address, self.credentials, secret=self.secret) as channel:
            registry = pb_grpc.RegistryStub(channel)
            backoff, interval, reported_down = 0.2, 1.0, False
            while not self.stopping.is_set():
                try:
                    if not self.registered.is_set() and self.leaving.is_set():
                        self.stopping.wait(interval)
                    elif not self.registered.is_set():
                        reply = registry.Register(pb.RegisterRequest(info=self.info(), address=self.address,
                                                                     assign_key=self.assign_key), timeout=CALL_TIMEOUT_S)
                        interval = reply.heartbeat_interval_s or interval
                        self.on_registered(reply.incarnation)
                        self.registered.set()
                        log.info("registered with the coordinator of cluster %s at %s", reply.cluster,
                                 self.coordinator_address)
                    else:
                        beat = registry.Heartbeat(self.heartbeat(), timeout=CALL_TIMEOUT_S)
                        if not beat.known:
                            self.registered.clear()
                            continue
                    backoff, reported_down = 0.2, False
                    self.stopping.wait(interval)
                except grpc.RpcError as exc:
                    if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                        self.on_refused(exc.details())
                        return
                    self.registered.clear()
                    if not reported_down:
                        log.warning("coordinator at %s unreachable (%s); retrying", self.coordinator_address,
                                    exc.code().name)
                        reported_down = True
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)

    def leave(self, timeout_s: float) -> pb.DrainReply:
        """Ask the coordinator to move this node's stages to the others; when it has, the node stops beating.
        SpeedError with the coordinator's sentence when it cannot."""
        self.leaving.set()
        try:
            with open_channel(self.coordinator_address, self.credentials, secret=self.secret) as channel:
                reply = pb_grpc.RegistryStub(channel).Leave(pb.LeaveRequest(name=self.info().name), timeout=timeout_s)
        except grpc.RpcError as exc:
            self.leaving.clear()
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the coordinator's own sentence
                raise SpeedError(exc.details()) from None
            raise SpeedError(f"the coordinator at {self.coordinator_address} did not answer ({exc.code().name}); the "
                             "node keeps its stages") from None
        self.stopping.set()
        return reply

    def heartbeat(self) -> pb.HeartbeatRequest:
        info, load = self.info(), self.recent.read()
        return pb.HeartbeatRequest(name=info.name, open_sequences=info.open_sequences, step_ms=load.step_ms,
                                   memory_available_bytes=info.memory_available_bytes, links=info.links,
                                   positions_per_s=load.positions_per_s)
