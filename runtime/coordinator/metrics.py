"""Prometheus metrics of the coordinator: requests, scheduling, speculation flips, step latency and node health.

Each instance owns its registry, so several coordinators (as in tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest

from runtime.core.node_state import NodeState
from runtime.wire.metrics_http import LATENCY_BUCKETS, serve_registry

OUTCOMES = ("completed", "failed", "cancelled", "deadline_exceeded", "rejected", "invalid", "unauthenticated")
NODE_STATES = [str(state) for state in NodeState]


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter("speed_coordinator_requests", "Requests ended, by outcome.", ["outcome"], registry=r)
        for outcome in OUTCOMES:  # every outcome shows up from the start, at 0
            self._requests.labels(outcome)
        self._queue_depth = Gauge("speed_coordinator_queue_depth", "Requests waiting to be admitted.", registry=r)
        self._active = Gauge("speed_coordinator_active_requests", "Requests being decoded.", registry=r)
        self._sequences = Gauge("speed_coordinator_sequences", "Sequences held on each node.", ["node"], registry=r)
        self._tokens = Counter("speed_coordinator_tokens_committed", "Tokens committed to requests.", registry=r)
        self._ticks = Counter("speed_coordinator_ticks", "Pipeline ticks run.", registry=r)
        self._flips = Counter("speed_coordinator_flips", "Speculated tokens that flipped, by stage boundary.",
                              ["boundary"], registry=r)
        self._flip_checks = Counter("speed_coordinator_flip_checks", "Speculated tokens checked, by stage boundary.",
                                    ["boundary"], registry=r)
        self._step = Histogram("speed_coordinator_step_seconds", "Round-trip time of one step on a node.", ["node"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self._failovers = Counter("speed_coordinator_failovers", "Failovers, by the node that was lost.", ["node"],
                                  registry=r)
        self._replayed = Counter("speed_coordinator_sequences_replayed", "Sequences replayed onto another node.",
                                 registry=r)
        self._node_up = Gauge("speed_coordinator_node_up", "1 while the node is serving, else 0.", ["node"], registry=r)
        self._node_state = Enum("speed_coordinator_node_state", "State of each node.", ["node"], states=NODE_STATES,
                                registry=r)

    def request_ended(self, outcome: str) -> None:
        self._requests.labels(outcome).inc()

    def set_queue_depth(self, n: int) -> None:
        self._queue_depth.set(n)

    def set_active_requests(self, n: int) -> None:
        self._active.set(n)

    def set_sequences(self, node: str, n: int) -> None:
        self._sequences.labels(node).set(n)

    def tokens_committed(self, n: int) -> None:
        self._tokens.inc(n)

    def tick(self) -> None:
        self._ticks.inc()

    def flips(self, boundary: int, flips: int, checks: int) -> None:
        self._flips.labels(str(boundary)).inc(flips)
        self._flip_checks.labels(str(boundary)).inc(checks)

    def step_seconds(self, node: str, seconds: float) -> None:
        self._step.labels(node).observe(seconds)

    def failover(self, node: str) -> None:
        self._failovers.labels(node).inc()

    def sequences_replayed(self, n: int) -> None:
        self._replayed.inc(n)

    def node_state(self, node: str, state: str) -> None:
        """Set the node's state, one of NODE_STATES; node_up follows it."""
        self._node_state.labels(node).state(state)
        self._node_up.labels(node).set(1 if state == NodeState.SERVING else 0)

    def serve(self, host: str, port: int) -> None:
        serve_registry(self.registry, host, port, what="coordinator metrics")

    def render(self) -> bytes:
        return generate_latest(self.registry)
