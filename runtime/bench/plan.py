"""`speed plan FILE`: the tokens/s candidate placements of a running cluster's stages would give on the ring
data path, predicted from what its nodes measured of themselves (pass times, classifier, link round trips)
and the flip rates the coordinator has seen (else the bundle's) by a simulation of the ring
(runtime/core/ring_timing.py).

Candidates: runtime/core/placement_search.py's, the file's own placement first.
"""

from __future__ import annotations

from runtime.coordinator.auto_placement import flip_rates, link_ms, node_timings, ring_model
from runtime.core.bundle import Bundle
from runtime.core.cluster_file import ClusterSpec
from runtime.core.errors import SpeedError
from runtime.core.placement_search import hostable_by, ranked
from runtime.wire import speed_pb2 as pb


def plan(spec: ClusterSpec, bundle: Bundle, status: pb.ClusterStatusReply) -> dict:
    """Every candidate with its predicted tokens/s, the file's own placement first, then best first."""
    n_stages = bundle.config.n_stages
    timings = node_timings(status.nodes)
    missing = [node.name for node in spec.nodes if node.name not in timings]
    if missing:
        raise SpeedError(f"node(s) {', '.join(missing)} reported no measurements; start every node of the cluster "
                         "(each measures itself when it starts) and plan again")
    hostable = hostable_by(timings, n_stages)
    nobody = next((stage for stage, names in hostable.items() if not names), None)
    if nobody is not None:
        raise SpeedError(f"no node reported it can host stage {nobody}; start its node and plan again")
    seen = sorted(status.flips, key=lambda count: count.boundary)
    flips, flips_from = flip_rates(bundle, [count.flips for count in seen], [count.checks for count in seen])
    model = ring_model(spec, bundle, timings, link_ms(spec, {node.name: node.links for node in status.nodes}), flips)
    own = {stage: node.name for node in spec.nodes for stage in node.stages}
    return {"cluster": spec.name, "bundle": bundle.manifest["name"], "data_path": "ring",
            "file_data_path": str(spec.data_path), "window": model.window, "mode": model.mode, "flips": list(flips),
            "guess_thresholds": list(model.thresholds), "flips_from": flips_from, "candidates": [
                {"placement": {name: c.stages_of(name) for name in timings}, "sequential_tokens_per_s": c.sequential,
                 "speculative_tokens_per_s": c.speculative, "files_own": i == 0}
                for i, c in enumerate(ranked(model, own, hostable))]}


def format_plan(report: dict, top: int) -> str:
    mode = report["mode"]
    lines = [f"{report['cluster']} ({report['bundle']}), predicted for the ring data path, {mode} "
             f"(window {report['window']}); flip rates {', '.join(f'{f:.1%}' for f in report['flips'])} "
             f"({report['flips_from']})"]
    if report["file_data_path"] != "ring":
        lines.append(f"  note: the file's data path is {report['file_data_path']}; lockstep is not modelled")
    for i, c in enumerate(report["candidates"][: top + 1]):
        placed = "  ".join(f"{name}: {','.join(map(str, stages)) or '-'}" for name, stages in c["placement"].items())
        label = "the file's" if c["files_own"] else f"#{i}"
        lines.append(f"  {label:>10}  {c[mode + '_tokens_per_s']:8.1f} tokens/s {mode}, "
                     f"{c['sequential_tokens_per_s']:.1f} sequential   {placed}")
    return "\n".join(lines)
