"""A node as the coordinator sees it; `speed status`, ClusterStatus and the metrics show these words."""

from __future__ import annotations

from runtime.core.text_enum import TextEnum


class NodeState(TextEnum):
    WAITING = "waiting"  # named in the cluster file, not registered (yet, or since the coordinator started)
    SERVING = "serving"  # registered and answering heartbeats: its stages can be placed on it
    DOWN = "down"  # missed its heartbeats or its step stream broke: its stages move elsewhere
    LEFT = "left"  # drained: it handed its stages over and stopped, on purpose
