"""`speed bench FILE`: sequential against speculative decoding through a cluster started here.

Runs alternate between single-process plain decoding (the reference), the cluster in sequential mode,
the cluster in speculative mode sending every guess, and, when the bundle has exits, guessing
without them, and when a confidence gate is set, behind the gate, on the same prompts; medians are
reported. EOS is ignored so every run decodes the same number of tokens. --emulate-link-ms adds an
EMULATED one-way latency to every step message between the coordinator and each node (no real network
is slowed).
"""

from __future__ import annotations

from pathlib import Path

from deploy.launcher import LocalCluster
from runtime.bench.local import LOCAL_PROMPTS, sampled
from runtime.bench.tally import ModeTally, describe_speculation
from runtime.client import Client
from runtime.core.bundle import load_bundle
from runtime.core.generation import guess_thresholds
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain

# user messages for instruction-tuned chat models (Bundle.answers_questions)
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a CPU cache is.",
    "Give three tips for learning Python.",
)


def bench_cluster(cluster_path: Path, *, new_tokens: int = 128, repeats: int = 3,
                  emulated_link_ms: float | None = None, sampling: SamplingParams = GREEDY,
                  guess_threshold: float | None = None, progress: Progress = NO_PROGRESS) -> dict:
    """guess_threshold: the gate of the gated mode; None: the cluster file's, else the bundle's (no gated
    mode when neither has one)."""
    cluster = LocalCluster(cluster_path, emulated_link_ms=emulated_link_ms, progress=progress)
    bundle = load_bundle(cluster.spec.bundle)
    devices = {node.device for node in cluster.spec.nodes}
    device = devices.pop() if len(devices) == 1 else "cpu"  # the single process runs where every node does
    model = open_stage_model(bundle, device=device, threads=1)
    tokenizer = bundle.tokenizer()
    chat = bundle.answers_questions
    prompts = CHAT_PROMPTS if chat else LOCAL_PROMPTS
    modes = {"sequential": {"speculative": False}, "speculative": {"speculative": True, "guess_threshold": 0.0}}
    if bundle.exits:
        modes["speculative_plain_guesses"] = {"speculative": True, "plain_guesses": True, "guess_threshold": 0.0}
    thresholds = guess_thresholds((guess_threshold, cluster.spec.speculation.guess_threshold), bundle.guess_thresholds,
                                  bundle.config.n_stages)
    if thresholds:
        modes["gated"] = {"speculative": True, "guess_threshold": guess_threshold}
    tallies = {mode: ModeTally() for mode in ("reference", *modes)}
    with (cluster, Client(cluster.endpoint, credentials=cluster.credentials()) as client,
          progress.task("runs", total=repeats * len(prompts) * len(tallies))):
        client.generate(prompts[0], max_new_tokens=8, chat=chat).result()  # warm-up
        for _ in range(repeats):
            for prompt in prompts:
                ids = tokenizer.encode(bundle.prompt_text(prompt, chat=chat)).ids
                tallies["reference"].add(generate_plain(model, ids, max_new_tokens=new_tokens, eos_id=-1,
                                                        sampling=sampling).tokens_per_s)
                progress.advance()
                for mode, options in modes.items():
                    result = client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, chat=chat,
                                             temperature=sampling.temperature, seed=sampling.seed, **options).result()
                    tallies[mode].add(result.tokens_per_s, result.stats if options["speculative"] else None)
                    progress.advance()
    median = {mode: tally.median for mode, tally in tallies.items()}
    report = {
        "cluster": cluster.spec.name,
        "bundle": bundle.manifest["name"],
        "nodes": len(cluster.spec.nodes),
        "reference_device": device,
        "emulated_link_ms": {node.name: node.emulated_link_ms if emulated_link_ms is None else emulated_link_ms
                             for node in cluster.spec.nodes},
        "temperature": sampling.temperature,
        "new_tokens": new_tokens,
        "runs": repeats * len(prompts),
        "reference_tokens_per_s": round(median["reference"], 1),
        **{f"{mode}_tokens_per_s": round(median[mode], 1) for mode in modes},
        "speedup": round(median["speculative"] / median["sequential"], 2),
        "sequential_over_reference": round(median["sequential"] / median["reference"], 2),
        **tallies["speculative"].speculation(),
    }
    for mode, suffix in (("speculative_plain_guesses", "plain_guesses"), ("gated", "gated")):
        if mode in modes:
            report[f"speedup_{suffix}"] = round(median[mode] / median["sequential"], 2)
            report[suffix] = tallies[mode].speculation()
    if "gated" in modes:
        report["gated"]["guess_thresholds"] = list(thresholds)
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
        + describe_speculation(report),
    ]
    if "plain_guesses" in report:
        lines.append(f"  without exits          {report['speculative_plain_guesses_tokens_per_s']:8.1f} tokens/s   "
                     f"speedup {report['speedup_plain_guesses']:.2f}x; " + describe_speculation(report["plain_guesses"]))
    if "gated" in report:
        thresholds = " ".join(f"{t:g}" for t in report["gated"]["guess_thresholds"])
        lines.append(f"  gated speculative      {report['gated_tokens_per_s']:8.1f} tokens/s   "
                     f"speedup {report['speedup_gated']:.2f}x; {describe_speculation(report['gated'])} "
                     f"(thresholds {thresholds})")
    return "\n".join(lines)
