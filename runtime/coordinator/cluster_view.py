"""What a data path sees of the cluster: the model, the nodes, where each stage runs now, the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.coordinator.metrics import CoordinatorMetrics
from runtime.coordinator.remote_node import RemoteNode
from runtime.coordinator.requests import Request
from runtime.core.config import ModelConfig


@dataclass
class ClusterView:
    config: ModelConfig
    nodes: dict[str, RemoteNode]
    metrics: CoordinatorMetrics
    incarnation: int  # this coordinator's run
    eos_id: int
    placement: dict[int, str] = field(default_factory=dict)  # stage -> the node running it; empty while a stage has none

    def sequence_options(self, request: Request) -> dict:
        """How the pure core decodes a request: new_sequence's options."""
        return dict(max_new_tokens=request.options.max_new_tokens, context_length=self.config.context_length,
                    speculate=request.speculative, guess_thresholds=request.guess_thresholds,
                    eos_id=None if request.options.ignore_eos else self.eos_id, should_stop=request.stop or None,
                    generated=request.received)

