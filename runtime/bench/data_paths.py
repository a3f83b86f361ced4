"""`speed bench FILE --data-paths MS,...`: both data paths of one cluster file, sequential and speculative,
at each EMULATED link latency, beside single-process plain decoding.

For every latency the cluster is started once per data path (lockstep: every tick a round trip through
the coordinator; ring: nodes forward to each other and stage 0 runs ahead); runs alternate between the
single process, sequential and speculative on the same prompts, and medians are reported. EOS is
ignored so every run decodes the same number of tokens.
"""

from __future__ import annotations

from pathlib import Path

from deploy.launcher import LocalCluster
from runtime.bench.cluster import CHAT_PROMPTS
from runtime.bench.local import LOCAL_PROMPTS, sampled
from runtime.bench.tally import ModeTally, describe_speculation
from runtime.client import Client
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import DATA_PATHS, load_cluster
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain


def bench_data_paths(cluster_path: Path, *, link_ms: tuple[float, ...] = (0.0, 5.0, 20.0), new_tokens: int = 64,
                     repeats: int = 1, sampling: SamplingParams = GREEDY, window: int | None = None,
                     progress: Progress = NO_PROGRESS) -> dict:
    """window: positions stage 0 runs ahead on the ring (default: the cluster file's)."""
    spec = load_cluster(cluster_path)
    bundle = load_bundle(spec.bundle)
    model = open_stage_model(bundle, threads=1)
    tokenizer = bundle.tokenizer()
    chat = bundle.answers_questions
    prompts = CHAT_PROMPTS if chat else LOCAL_PROMPTS
    options = dict(max_new_tokens=new_tokens, ignore_eos=True, chat=chat, temperature=sampling.temperature,
                   seed=sampling.seed, guess_threshold=0.0)
    rows = []
    runs = len(link_ms) * len(DATA_PATHS) * repeats * len(prompts) * 3  # single process, sequential, speculative
    with progress.task("runs", total=runs):
        for ms in link_ms:
            reference = ModeTally()
            row = {"emulated_link_ms": ms}
            for path in DATA_PATHS:
                tallies = {"sequential": ModeTally(), "speculative": ModeTally()}
                cluster = LocalCluster(cluster_path, emulated_link_ms=ms, data_path=path)
                with cluster, Client(cluster.endpoint, credentials=cluster.credentials()) as client:
                    client.generate(prompts[0], max_new_tokens=8, chat=chat).result()  # warm-up
                    for _ in range(repeats):
                        for prompt in prompts:
                            ids = tokenizer.encode(bundle.prompt_text(prompt, chat=chat)).ids
                            reference.add(generate_plain(model, ids, max_new_tokens=new_tokens, eos_id=-1,
                                                         sampling=sampling).tokens_per_s)
                            progress.advance()
                            for mode, tally in tallies.items():
                                speculative = mode == "speculative"
                                result = client.generate(prompt, speculative=speculative, window=window, **options).result()
                                tally.add(result.tokens_per_s, result.stats if speculative else None)
                                progress.advance()
                row[path] = {"sequential_tokens_per_s": round(tallies["sequential"].median, 1),
                             "speculative_tokens_per_s": round(tallies["speculative"].median, 1),
                             **tallies["speculative"].speculation()}
            row["single_process_tokens_per_s"] = round(reference.median, 1)
            row["ring_over_lockstep_speculative"] = round(
                row["ring"]["speculative_tokens_per_s"] / row["lockstep"]["speculative_tokens_per_s"], 2)
            row["ring_speculative_over_single_process"] = round(
                row["ring"]["speculative_tokens_per_s"] / row["single_process_tokens_per_s"], 2)
            rows.append(row)
    return {"cluster": spec.name, "bundle": bundle.manifest["name"], "nodes": len(spec.nodes),
            "window": spec.speculation.window if window is None else window, "temperature": sampling.temperature,
            "new_tokens": new_tokens, "runs": repeats * len(prompts), "rows": rows}


def format_data_paths(report: dict) -> str:
    lines = [f"cluster {report['cluster']} ({report['bundle']}, {report['nodes']} nodes), {report['new_tokens']} new "
             f"tokens, {sampled(report['temperature'])}, ring window {report['window']}, median of {report['runs']} "
             "alternating runs; tokens/s at each EMULATED one-way link latency",
             f"  {'link ms':>7}  {'single':>7}  {'lockstep seq':>12}  {'lockstep spec':>13}  {'ring seq':>8}  "
             f"{'ring spec':>9}  {'ring/lockstep spec':>18}"]
    for row in report["rows"]:
        lock, ring = row["lockstep"], row["ring"]
        lines.append(f"  {row['emulated_link_ms']:>7g}  {row['single_process_tokens_per_s']:>7.1f}  "
                     f"{lock['sequential_tokens_per_s']:>12.1f}  {lock['speculative_tokens_per_s']:>13.1f}  "
                     f"{ring['sequential_tokens_per_s']:>8.1f}  {ring['speculative_tokens_per_s']:>9.1f}  "
                     f"{row['ring_over_lockstep_speculative']:>17.2f}x")
    for row in report["rows"]:
        for path in DATA_PATHS:
            lines.append(f"  {row['emulated_link_ms']:g} ms {path} speculative: {describe_speculation(row[path])}")
    return "\n".join(lines)
