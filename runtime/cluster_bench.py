"""`speed bench FILE`: sequential against speculative decoding through a cluster started here.

Runs alternate between single-process plain decoding (the reference), the cluster in sequential mode
and the cluster in speculative mode, on the same prompts, and medians are reported. EOS is ignored so
every run decodes the same number of tokens. --emulate-link-ms adds an EMULATED one-way latency to
every step message between the coordinator and each node (no real network is slowed).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from deploy.launcher import LocalCluster
from runtime.benchmark import LOCAL_PROMPTS
from runtime.bundle import load_bundle
from runtime.client import Client
from runtime.reference import generate_plain, open_stage_model


def bench_cluster(cluster_path: Path, *, new_tokens: int = 128, repeats: int = 3,
                  emulated_link_ms: float | None = None) -> dict:
    cluster = LocalCluster(cluster_path, emulated_link_ms=emulated_link_ms)
    bundle = load_bundle(cluster.spec.bundle)
    model = open_stage_model(bundle, threads=1)
    tokenizer = bundle.tokenizer()
    rates: dict[str, list[float]] = {"reference": [], "sequential": [], "speculative": []}
    ticks = committed = 0
    flips = np.zeros(bundle.config.n_stages - 1)
    with cluster, Client(cluster.endpoint) as client:
        client.generate(LOCAL_PROMPTS[0], max_new_tokens=8).result()  # warm-up
        for _ in range(repeats):
            for prompt in LOCAL_PROMPTS:
                reference = generate_plain(model, tokenizer.encode(prompt).ids, max_new_tokens=new_tokens, eos_id=-1)
                rates["reference"].append(reference.tokens_per_s)
                sequential = client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, speculative=False)
                rates["sequential"].append(sequential.result().tokens_per_s)
                speculative = client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True,
                                              speculative=True).result()
                rates["speculative"].append(speculative.tokens_per_s)
                ticks += speculative.stats["ticks"]
                committed += speculative.stats["committed"]
                flips += speculative.stats["flips_per_boundary"]
    median = {mode: statistics.median(r) for mode, r in rates.items()}
    links = {node.name: node.emulated_link_ms if emulated_link_ms is None else emulated_link_ms
             for node in cluster.spec.nodes}
    return {
        "cluster": cluster.spec.name,
        "nodes": len(cluster.spec.nodes),
        "emulated_link_ms": links,
        "new_tokens": new_tokens,
        "runs": repeats * len(LOCAL_PROMPTS),
        "reference_tokens_per_s": round(median["reference"], 1),
        "sequential_tokens_per_s": round(median["sequential"], 1),
        "speculative_tokens_per_s": round(median["speculative"], 1),
        "speedup": round(median["speculative"] / median["sequential"], 2),
        "sequential_over_reference": round(median["sequential"] / median["reference"], 2),
        "flips_per_boundary": [round(p, 4) for p in flips / (repeats * len(LOCAL_PROMPTS))],
        "ticks_per_token": round(ticks / committed, 3),
    }


def format_cluster(report: dict) -> str:
    links = sorted(set(report["emulated_link_ms"].values()))
    link = "no emulated latency" if links == [0] else f"EMULATED one-way link latency {', '.join(map(str, links))} ms"
    flips = "  ".join(f"{p:.1%}" for p in report["flips_per_boundary"])
    return "\n".join([
        f"cluster {report['cluster']} ({report['nodes']} nodes, {link}), {report['new_tokens']} new tokens, "
        f"median of {report['runs']} alternating runs",
        f"  single process (plain) {report['reference_tokens_per_s']:8.1f} tokens/s",
        f"  cluster sequential     {report['sequential_tokens_per_s']:8.1f} tokens/s   "
        f"{report['sequential_over_reference']:.2f}x the single process",
        f"  cluster speculative    {report['speculative_tokens_per_s']:8.1f} tokens/s   speedup {report['speedup']:.2f}x",
        f"  flips per boundary {flips}; ticks per token {report['ticks_per_token']}",
    ])
