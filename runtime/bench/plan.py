"""`speed plan FILE`: the tokens/s candidate placements of a running cluster's stages would give on its data
path, predicted from what its nodes measured of themselves (pass times, classifier, link round trips)
and the flip rates the coordinator has seen (else the bundle's) by a simulation of the ring's
state machines or of the lockstep scheduler (runtime/core/ring_timing.py, lockstep_timing.py).

Candidates: runtime/core/placement_search.py's, the file's own placement first.
"""

from __future__ import annotations

from dataclasses import replace

from runtime.coordinator.auto_placement import calibrated, flip_rates, link_ms, node_timings, timing_model
from runtime.core.bundle import Bundle
from runtime.core.cluster_file import ClusterSpec
from runtime.core.errors import SpeedError
from runtime.core.placement_search import hostable_by, ranked
from runtime.wire import speed_pb2 as pb

CALIBRATED = 64  # candidates, best first, predicted again with the fitted cost of a run (each takes a simulation)


def plan(spec: ClusterSpec, bundle: Bundle, status: pb.ClusterStatusReply) -> dict:
    """Every candidate with its predicted tokens/s, the file's own placement first, then best first."""
    n_stages = bundle.config.n_stages
    timings = node_timings(status.nodes)
    states = {node.name: pb.NodeState.Name(node.state).removeprefix("NODE_STATE_").lower() for node in status.nodes}
    missing = [f"{node.name} ({states.get(node.name, 'unknown')})" for node in spec.nodes if node.name not in timings]
    if missing:
        raise SpeedError(f"node(s) {', '.join(missing)} reported no measurements yet; a node measures itself when it "
                         "starts and tells the coordinator when it registers (a coordinator that has just started hears "
                         "from each within a few heartbeats): start every node, wait until `speed status` shows each "
                         "serving, and plan again")
    hostable = hostable_by(timings, n_stages)
    nobody = next((stage for stage, names in hostable.items() if not names), None)
    if nobody is not None:
        raise SpeedError(f"no node reported it can host stage {nobody}; start its node and plan again")
    seen = sorted(status.flips, key=lambda count: count.boundary)
    flips, flips_from = flip_rates(bundle, [count.flips for count in seen], [count.checks for count in seen])
    model = timing_model(spec, bundle, timings, link_ms(spec, {node.name: node.links for node in status.nodes}), flips)
    own = {stage: node.name for node in spec.nodes for stage in node.stages}
    now = {stage: node.name for node in status.nodes for stage in node.hosting}
    fitted, fitted_to = calibrated(model, now, status.alone_sequential_tokens_per_s, status.alone_speculative_tokens_per_s)
    model = replace(model, guess_draws=fitted.guess_draws)  # the guesses fitted to what `now` counted, in both
    candidates = ranked(model, own, hostable)
    current = next((c for c in candidates if c.placement == now), None)
    again = {id(c) for c in [candidates[0], *([current] if current else []), *candidates[1:CALIBRATED]]}

    def entry(i: int, c) -> dict:
        fields = {"placement": {name: c.stages_of(name) for name in timings}, "files_own": i == 0,
                  "current": c is current}
        with_cost = fitted.score(c.placement) if fitted_to is not None and id(c) in again else None
        for mode in ("sequential", "speculative"):
            fields[f"{mode}_tokens_per_s"] = c.rate(mode)
            fields[f"calibrated_{mode}_tokens_per_s"] = with_cost.rate(mode) if with_cost else None
        return fields

    return {"cluster": spec.name, "bundle": bundle.manifest["name"], "data_path": str(spec.data_path),
            "window": model.window, "mode": model.mode, "flips": list(flips),
            "knows_better": list(model.knows_better),
            "guess_thresholds": list(model.thresholds), "flips_from": flips_from,
            "calibration": {"run_overhead_ms": fitted.run_overhead_ms if fitted_to else None,
                            "message_ms": fitted.message_ms if fitted_to else None, "fitted_to": fitted_to},
            "candidates": [entry(i, c) for i, c in enumerate(candidates)]}


def format_plan(report: dict, top: int) -> str:
    mode = report["mode"]
    lines = [f"{report['cluster']} ({report['bundle']}), predicted for the {report['data_path']} data path, {mode} "
             f"(window {report['window']}); flip rates {', '.join(f'{f:.1%}' for f in report['flips'])} "
             f"({report['flips_from']})"]
    calibration = report["calibration"]
    if calibration["fitted_to"] is not None:
        messages = f" and a message beyond one a run {calibration['message_ms']:.2f} ms" if calibration["message_ms"] else ""
        lines.append(f"  calibrated: a run costs {calibration['run_overhead_ms']:.2f} ms beside its pass{messages}, as the "
                     f"current placement's {calibration['fitted_to']} requests decoding alone measured")
    for i, c in enumerate(report["candidates"][: top + 1]):
        placed = "  ".join(f"{name}: {','.join(map(str, stages)) or '-'}" for name, stages in c["placement"].items())
        label = "the file's" if c["files_own"] else f"#{i}"
        figure = c[f"calibrated_{mode}_tokens_per_s"]
        shown = f"{figure:8.1f} tokens/s {mode}, model" if figure is not None else f"{'':8} model, {mode}"
        lines.append(f"  {label:>10}  {shown} {c[mode + '_tokens_per_s']:.1f}, {c['sequential_tokens_per_s']:.1f} "
                     f"sequential{'  (now)' if c['current'] else ''}   {placed}")
    return "\n".join(lines)
