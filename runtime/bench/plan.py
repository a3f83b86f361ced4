"""`speed plan FILE`: the tokens/s candidate placements of a running cluster's stages would give on the ring
data path, predicted from what its nodes measured of themselves (pass times, classifier, link round trips)
and the bundle's flip rates by a simulation of the ring (runtime/core/ring_timing.py).

Candidates: every way to give each stage to a node that can host it, while there are at most
MAX_CANDIDATES; beyond, the file's placement and every placement that moves one stage from it.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from runtime.core.bundle import TRAINING_REPORT_FILE, Bundle
from runtime.core.cluster_file import ClusterSpec
from runtime.core.errors import SpeedError
from runtime.core.generation import guess_thresholds
from runtime.core.ring_timing import NodeTiming, RingTiming
from runtime.wire import speed_pb2 as pb

MAX_CANDIDATES = 4096
PROMPT_TOKENS, NEW_TOKENS = 16, 128  # the request each candidate decodes in the simulation
UNKNOWN_FLIP = 0.5  # an early stage's guesses, where the bundle reports nothing


@dataclass(frozen=True)
class Candidate:
    placement: dict[int, str]  # stage -> node
    sequential: float  # predicted tokens/s
    speculative: float

    def stages_of(self, node: str) -> list[int]:
        return sorted(stage for stage, name in self.placement.items() if name == node)


def plan(spec: ClusterSpec, bundle: Bundle, status: pb.ClusterStatusReply) -> dict:
    """Every candidate with its predicted tokens/s, the file's own placement first, then best first."""
    n_stages = bundle.config.n_stages
    timings = {node.name: NodeTiming({(p.stage, p.rows): p.ms for p in node.pass_times}, node.head_ms)
               for node in status.nodes if node.pass_times}
    missing = [node.name for node in spec.nodes if node.name not in timings]
    if missing:
        raise SpeedError(f"node(s) {', '.join(missing)} reported no measurements; start every node of the cluster "
                         "(each measures itself when it starts) and plan again")
    own = {stage: node.name for node in spec.nodes for stage in node.stages}
    hostable = {stage: [name for name, timing in timings.items() if any(s == stage for s, _ in timing.pass_ms)]
                for stage in range(n_stages)}
    flips, flips_from = flip_rates(bundle)
    link = link_ms(spec, status)
    window = spec.speculation.window if spec.speculation.enabled else 0
    thresholds = guess_thresholds((spec.speculation.guess_threshold,), bundle.guess_thresholds, n_stages)

    def candidate(placement: dict[int, str]) -> Candidate:
        def rate(ahead: int) -> float:
            return round(RingTiming(placement, timings, link, flips, ahead, thresholds,
                                    prefill_chunk=spec.speculation.prefill_chunk).decode(PROMPT_TOKENS, NEW_TOKENS), 1)

        return Candidate(placement, rate(0), rate(window) if window else rate(0))

    placements = _placements(own, hostable, n_stages)
    mode = "speculative" if window else "sequential"
    ranked = [candidate(own)] + sorted((candidate(p) for p in placements if p != own),
                                       key=lambda c: -getattr(c, mode))
    return {"cluster": spec.name, "bundle": bundle.manifest["name"], "data_path": "ring",
            "file_data_path": str(spec.data_path), "window": window, "mode": mode, "flips": list(flips),
            "guess_thresholds": list(thresholds),
            "flips_from": flips_from, "candidates": [
                {"placement": {name: c.stages_of(name) for name in timings}, "sequential_tokens_per_s": c.sequential,
                 "speculative_tokens_per_s": c.speculative, "files_own": i == 0} for i, c in enumerate(ranked)]}


def flip_rates(bundle: Bundle) -> tuple[tuple[float, ...], str]:
    """Per early stage, how often its guess is wrong: the training report's held-out rates, else the gate's
    agreement, else UNKNOWN_FLIP."""
    early = bundle.config.n_stages - 1
    if TRAINING_REPORT_FILE in bundle.manifest["files"]:
        rates = json.loads((bundle.path / TRAINING_REPORT_FILE).read_text())["held_out"]["flip_rate_per_boundary"]
        return tuple(rates[:early]), "the training report's held-out flip rates"
    stages = (bundle.manifest.get("guess_gate") or {}).get("report", {}).get("stages", [])
    if len(stages) >= early and all("agreement" in stage for stage in stages[:early]):
        return tuple(1 - stage["agreement"] for stage in stages[:early]), "the confidence gate's held-out agreement"
    return (UNKNOWN_FLIP,) * early, f"none reported: {UNKNOWN_FLIP} assumed"


def link_ms(spec: ClusterSpec, status: pb.ClusterStatusReply):
    """One-way latency from one node to another: half the round trip the sender measured (or the receiver,
    or 0 where neither did), plus the sender's emulated link latency."""
    rtt = {(node.name, link.node): link.rtt_ms for node in status.nodes for link in node.links}
    emulated = {node.name: node.emulated_link_ms for node in spec.nodes}

    def one_way(src: str, dst: str) -> float:
        return rtt.get((src, dst), rtt.get((dst, src), 0.0)) / 2 + emulated.get(src, 0.0)

    return one_way


def _placements(own: dict[int, str], hostable: dict[int, list[str]], n_stages: int) -> list[dict[int, str]]:
    choices = [hostable[stage] for stage in range(n_stages)]
    if any(not names for names in choices):
        stage = next(s for s in range(n_stages) if not hostable[s])
        raise SpeedError(f"no node reported it can host stage {stage}; start its node and plan again")
    count = 1
    for names in choices:
        count *= len(names)
    if count <= MAX_CANDIDATES:
        return [dict(enumerate(names)) for names in itertools.product(*choices)]
    return [{**own, stage: name} for stage in range(n_stages) for name in hostable[stage]]


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
