"""`speed bench FILE`: sequential against speculative decoding through a cluster started here.

Runs alternate between single-process plain decoding (the reference), the cluster in sequential mode
and the cluster in speculative mode (and, when the bundle has exit adapters, speculative mode guessing
without them), on the same prompts, and medians are reported. EOS is ignored so every run decodes the
same number of tokens. --emulate-link-ms adds an EMULATED one-way latency to every step message
between the coordinator and each node (no real network is slowed).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from deploy.launcher import LocalCluster
from runtime.bench.local import LOCAL_PROMPTS, sampled
from runtime.client import Client
from runtime.core.bundle import load_bundle
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain

# user messages for models with a chat template
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a CPU cache is.",
    "Give three tips for learning Python.",
)


def bench_cluster(cluster_path: Path, *, new_tokens: int = 128, repeats: int = 3,
                  emulated_link_ms: float | None = None, sampling: SamplingParams = GREEDY) -> dict:
    cluster = LocalCluster(cluster_path, emulated_link_ms=emulated_link_ms)
    bundle = load_bundle(cluster.spec.bundle)
    model = open_stage_model(bundle, threads=1)
    tokenizer = bundle.tokenizer()
    chat = bool(bundle.chat_template)
    prompts = CHAT_PROMPTS if chat else LOCAL_PROMPTS
    modes = {"sequential": {"speculative": False}, "speculative": {"speculative": True}}
    if bundle.exit_adapters():
        modes["speculative_plain_guesses"] = {"speculative": True, "plain_guesses": True}
    rates: dict[str, list[float]] = {"reference": [], **{mode: [] for mode in modes}}
    ticks = {mode: 0 for mode in modes}
    committed = {mode: 0 for mode in modes}
    flips = {mode: np.zeros(bundle.config.n_stages - 1) for mode in modes}
    with cluster, Client(cluster.endpoint, credentials=cluster.credentials()) as client:
        client.generate(prompts[0], max_new_tokens=8, chat=chat).result()  # warm-up
        for _ in range(repeats):
            for prompt in prompts:
                ids = tokenizer.encode(bundle.prompt_text(prompt, chat=chat)).ids
                rates["reference"].append(generate_plain(model, ids, max_new_tokens=new_tokens, eos_id=-1,
                                                         sampling=sampling).tokens_per_s)
                for mode, options in modes.items():
                    result = client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, chat=chat,
                                             temperature=sampling.temperature, seed=sampling.seed, **options).result()
                    rates[mode].append(result.tokens_per_s)
                    ticks[mode] += result.stats.ticks
                    committed[mode] += result.stats.committed
                    flips[mode] += result.stats.flips_per_boundary
    median = {mode: statistics.median(r) for mode, r in rates.items()}
    runs = repeats * len(prompts)
    report = {
        "cluster": cluster.spec.name,
        "bundle": bundle.manifest["name"],
        "nodes": len(cluster.spec.nodes),
        "emulated_link_ms": {node.name: node.emulated_link_ms if emulated_link_ms is None else emulated_link_ms
                             for node in cluster.spec.nodes},
        "temperature": sampling.temperature,
        "new_tokens": new_tokens,
        "runs": runs,
        "reference_tokens_per_s": round(median["reference"], 1),
        **{f"{mode}_tokens_per_s": round(median[mode], 1) for mode in modes},
        "speedup": round(median["speculative"] / median["sequential"], 2),
        "sequential_over_reference": round(median["sequential"] / median["reference"], 2),
        "flips_per_boundary": [round(p, 4) for p in flips["speculative"] / runs],
        "ticks_per_token": round(ticks["speculative"] / committed["speculative"], 3),
    }
    if "speculative_plain_guesses" in modes:
        plain = "speculative_plain_guesses"
        report["speedup_plain_guesses"] = round(median[plain] / median["sequential"], 2)
        report["flips_per_boundary_plain_guesses"] = [round(p, 4) for p in flips[plain] / runs]
        report["ticks_per_token_plain_guesses"] = round(ticks[plain] / committed[plain], 3)
    return report


def format_cluster(report: dict) -> str:
    links = sorted(set(report["emulated_link_ms"].values()))
    link = "no emulated latency" if links == [0] else f"EMULATED one-way link latency {', '.join(map(str, links))} ms"
    lines = [
        f"cluster {report['cluster']} ({report['bundle']}, {report['nodes']} nodes, {link}), {report['new_tokens']} "
        f"new tokens, {sampled(report['temperature'])}, median of {report['runs']} alternating runs",
        f"  single process (plain) {report['reference_tokens_per_s']:8.1f} tokens/s",
        f"  cluster sequential     {report['sequential_tokens_per_s']:8.1f} tokens/s   "
        f"{report['sequential_over_reference']:.2f}x the single process",
        f"  cluster speculative    {report['speculative_tokens_per_s']:8.1f} tokens/s   speedup {report['speedup']:.2f}x; "
        f"flips per boundary {'  '.join(f'{p:.1%}' for p in report['flips_per_boundary'])}; "
        f"ticks per token {report['ticks_per_token']}",
    ]
    if "speedup_plain_guesses" in report:
        flips = "  ".join(f"{p:.1%}" for p in report["flips_per_boundary_plain_guesses"])
        lines.append(f"  without exit adapters  {report['speculative_plain_guesses_tokens_per_s']:8.1f} tokens/s   "
                     f"speedup {report['speedup_plain_guesses']:.2f}x; flips per boundary {flips}; "
                     f"ticks per token {report['ticks_per_token_plain_guesses']}")
    return "\n".join(lines)
