"""Round trips from a node to the other nodes of its ring, measured after each assignment: what placing
stages by link speed needs to know.

A gRPC health check (answered by every node, in plain and secure clusters alike, without touching its
stages) is timed a few times over a channel like the ring's own; the median is kept. The probe runs on a
thread of its own, so an assignment never waits for it; a peer that does not answer is left out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodes.self_measure import median_ms
from runtime.wire import speed_pb2 as pb

PINGS = 5
PING_TIMEOUT_S = 2.0


class LinkProbe:
    def __init__(self, open_channel: Callable[[str, str], grpc.Channel]):
        self._open_channel = open_channel
        self._lock = threading.Lock()
        self._times: dict[str, float] = {}
        self._round = 0  # a newer assignment's probe replaces an older one's results

    def measure(self, peers: dict[str, str]) -> None:
        """Start timing the round trip to each peer (name -> address), replacing what was measured before."""
        with self._lock:
            self._round += 1
            self._times = {}
            round_ = self._round
        threading.Thread(target=self._run, args=(peers, round_), name="link-probe", daemon=True).start()

    def times(self) -> list[pb.LinkTime]:
        with self._lock:
            return [pb.LinkTime(node=name, rtt_ms=ms) for name, ms in sorted(self._times.items())]

    def _run(self, peers: dict[str, str], round_: int) -> None:
        for name, address in peers.items():
            ms = self._round_trip_ms(name, address)
            with self._lock:
                if round_ != self._round:
                    return
                if ms is not None:
                    self._times[name] = ms

    def _round_trip_ms(self, name: str, address: str) -> float | None:
        with self._open_channel(name, address) as channel:
            check = partial(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest(),
                            timeout=PING_TIMEOUT_S)
            try:
                return median_ms(check, PINGS)
            except grpc.RpcError:
                return None
