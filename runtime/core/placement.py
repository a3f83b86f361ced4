"""Which node runs which stage: each stage with its own node while that node serves, a lost one moved.

A pure function of the cluster's state, so the coordinator's failover rule can be read and tested
alone. A stage whose own node is not serving goes to a serving node that can run it (holds its graph),
preferring the node running the fewest stages (an idle standby first: the stages keep running side by
side), then one that already runs a neighbouring stage (the two then share a call and no hidden state
crosses the network), then the cluster file's order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def place(home: Mapping[str, Sequence[int]], can_run: Mapping[str, frozenset[int]], serving: Sequence[str],
          n_stages: int) -> dict[int, str]:
    """stage -> node for every stage some serving node can run; a stage left out cannot be served.

    home: each node's own stages (the cluster file), in the file's order; can_run: the stages each
    node holds graphs for; serving: the nodes that can take work now."""
    order = {name: i for i, name in enumerate(home)}
    placement = {stage: name for name, stages in home.items() if name in serving for stage in stages}
    for stage in range(n_stages):
        if stage in placement:
            continue
        candidates = [name for name in serving if stage in can_run.get(name, frozenset())]
        if candidates:
            placement[stage] = min(candidates, key=lambda name: (
                sum(1 for owner in placement.values() if owner == name),
                not _runs_neighbour(placement, name, stage),
                order.get(name, len(order)),
            ))
    return placement


def _runs_neighbour(placement: Mapping[int, str], name: str, stage: int) -> bool:
    return placement.get(stage - 1) == name or placement.get(stage + 1) == name


def stages_of(placement: Mapping[int, str], name: str) -> list[int]:
    return sorted(stage for stage, owner in placement.items() if owner == name)
