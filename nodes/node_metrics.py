"""Prometheus metrics of one node process: sequences held, stages hosted, step compute time and refused steps;
and the same step times over the last seconds, with the positions they processed, for its heartbeats.

Each instance owns its registry (no node label: a process runs one node), so tests can run several in one process.
Imports no torch, like the rest of `nodes`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from runtime.core.recent_rate import RecentRate
from runtime.wire.metrics_http import LATENCY_BUCKETS, serve_registry


class NodeMetrics:
    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        r = self.registry
        self._sequences = Gauge("speed_node_sequences", "Sequences held.", registry=r)
        self._max_sequences = Gauge("speed_node_max_sequences", "Most sequences this node may hold.", registry=r)
        self._hosting = Gauge("speed_node_hosting_stages", "Pipeline stages hosted.", registry=r)
        self._steps = Counter("speed_node_steps", "Step messages computed.", registry=r)
        self._step = Histogram("speed_node_step_seconds", "Compute time of one step message.", buckets=LATENCY_BUCKETS,
                               registry=r)
        self._refused = Counter("speed_node_refused_steps", "Step messages refused, by gRPC status name.", ["code"],
                                registry=r)
        self.recent = RecentRate()  # what its heartbeats report: step_ms and positions_per_s

    def set_sequences(self, n: int) -> None:
        self._sequences.set(n)

    def set_max_sequences(self, n: int) -> None:
        self._max_sequences.set(n)

    def set_hosting(self, stages: int) -> None:
        self._hosting.set(stages)

    def step(self, seconds: float, positions: int) -> None:
        """A batch (a step message, or a batch of ring runs) took `seconds` over `positions` positions."""
        self._steps.inc()
        self._step.observe(seconds)
        if positions:
            self.recent.add(positions, seconds)

    def refused(self, code: str) -> None:
        self._refused.labels(code).inc()

    def serve(self, host: str, port: int) -> None:
        serve_registry(self.registry, host, port, what=f"metrics of node {self.node}")

    def render(self) -> bytes:
        return generate_latest(self.registry)
