"""`speed bench FILE --cpu`: the compute a cluster spends per committed token, process by process, against
the whole model decoding in one process.

With the pipeline full, a cluster of separate devices decodes no faster than its busiest node allows, so
what matters is each node's CPU time per committed token against its share of one device's. For each
data path, greedy and sampled, sequential and speculative, the same prompts are decoded twice, to a short
and to a long length; the difference between the two cancels what a request costs once (its prefill, the
stream's set-up) and leaves the cost of a decoded token. The CPU time (user + system) of every process
comes from the operating system; where it went inside each node, from the node's own counters (Info).

- total ratio: every process's CPU per token / the single process's
- node ratio: the busiest node's CPU per token x nodes / the single process's (1.0: every node does just its share)
- projection: nodes / node ratio x the single process's tokens/s, what separate devices could reach with
  free links (a projection, not a measurement)
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import psutil

from deploy.launcher import LocalCluster
from runtime.bench.cluster import CHAT_PROMPTS
from runtime.bench.local import LOCAL_PROMPTS, sampled
from runtime.client import Client
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import DATA_PATHS, load_cluster
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.core.sampling import SamplingParams
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.security import operator_channel

SAMPLED_TEMPERATURE = 0.8
MODES = ("sequential", "speculative")
PROFILE_FIELDS = ("process_cpu_s", "worker_cpu_s", "stage_s", "stage_calls", "stage_positions", "exit_s", "guess_s",
                  "commit_s", "serialize_s")
# the breakdown of a node's CPU per committed token, in this order
PARTS = ("stage passes kept", "stage passes thrown away", "exits", "guess classifier", "last-stage classifier",
         "serialization", "Python bookkeeping", "gRPC and other threads")


def bench_cpu(cluster_path: Path, *, data_paths: tuple[str, ...] = DATA_PATHS,
              temperatures: tuple[float, ...] = (0.0, SAMPLED_TEMPERATURE), new_tokens: int = 128, repeats: int = 1,
              window: int | None = None, guess_threshold: float | None = None, progress: Progress = NO_PROGRESS) -> dict:
    """window: positions stage 0 runs ahead on the ring (default: the cluster file's); guess_threshold: the
    confidence gate of the speculative runs (default: the cluster file's, else the bundle's, else none)."""
    spec = load_cluster(cluster_path)
    bundle = load_bundle(spec.bundle)
    model = TimedStageCalls(open_stage_model(bundle, threads=1))
    chat = bundle.answers_questions
    prompts = CHAT_PROMPTS if chat else LOCAL_PROMPTS
    tokenizer = bundle.tokenizer()
    prompt_ids = [tokenizer.encode(bundle.prompt_text(p, chat=chat)).ids for p in prompts]
    lengths = (max(1, new_tokens // 4), new_tokens)
    runs = repeats * len(prompts) * len(lengths) * len(temperatures) * (1 + len(data_paths) * len(MODES))
    report = {"cluster": spec.name, "bundle": bundle.manifest["name"], "nodes": len(spec.nodes),
              "window": spec.speculation.window if window is None else window, "new_tokens": list(lengths),
              "prompts": len(prompts), "repeats": repeats, "single_process": {}, "cases": []}
    with progress.task("runs", total=runs):
        for temperature in temperatures:
            report["single_process"][str(temperature)] = single_process(
                model, prompt_ids, lengths, SamplingParams(temperature=temperature), repeats, progress)
        report["stage_call_one_process_ms"] = round(model.mean_ms, 4)
        for path in data_paths:
            cluster = LocalCluster(cluster_path, data_path=path)
            with cluster, Client(cluster.endpoint, credentials=cluster.credentials()) as client:
                client.generate(prompts[0], max_new_tokens=8, chat=chat).result()  # warm-up
                for temperature in temperatures:
                    single = report["single_process"][str(temperature)]
                    for mode in MODES:
                        generate = dict(chat=chat, ignore_eos=True, temperature=temperature, seed=0,
                                        speculative=mode == "speculative", guess_threshold=guess_threshold,
                                        window=window)
                        case = measure_case(cluster, client, prompts, lengths, repeats, generate, progress)
                        report["cases"].append({"data_path": path, "temperature": temperature, "mode": mode,
                                                **figures(case, single, len(spec.nodes))})
    return report


class TimedStageCalls:
    """A stage model whose one-token stage calls are timed (CPU of the calling thread): what a stage call
    costs while one process decodes, classifier and other stages in between, to set a node's calls against."""

    def __init__(self, model) -> None:
        self.model = model
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def run_stage(self, stage: int, hidden, cache, rows):
        started = time.thread_time()
        out = self.model.run_stage(stage, hidden, cache, rows)
        if hidden.shape[1] == 1:  # a decoded token, not a prompt
            self.seconds += time.thread_time() - started
            self.calls += 1
        return out

    @property
    def mean_ms(self) -> float:
        return self.seconds / max(self.calls, 1) * 1e3


def single_process(model, prompt_ids: list[list[int]], lengths: tuple[int, int], sampling: SamplingParams,
                   repeats: int, progress: Progress) -> dict:
    """CPU per token of plain decoding in this process (the difference of the two lengths), and tokens/s."""
    cpu = dict.fromkeys(lengths, 0.0)
    tokens = dict.fromkeys(lengths, 0)
    rates = []
    for _ in range(repeats):
        for ids in prompt_ids:
            for length in lengths:
                started = time.process_time()
                result = generate_plain(model, ids, max_new_tokens=length, eos_id=-1, sampling=sampling)
                cpu[length] += time.process_time() - started
                tokens[length] += len(result.token_ids)
                if length == lengths[-1]:
                    rates.append(result.tokens_per_s)
                progress.advance()
    short, long = lengths
    return {"cpu_ms_per_token": round((cpu[long] - cpu[short]) / (tokens[long] - tokens[short]) * 1e3, 4),
            "tokens_per_s": round(statistics.median(rates), 1)}


def measure_case(cluster: LocalCluster, client: Client, prompts: tuple[str, ...], lengths: tuple[int, int],
                 repeats: int, generate: dict, progress: Progress) -> dict:
    """Every process's CPU and every node's profile over the short runs and over the long runs."""
    processes = {name: psutil.Process(process.pid) for name, process in cluster.processes.items()}
    nodes = {node.name: pb_grpc.NodeStub(operator_channel(cluster.spec, node)) for node in cluster.spec.nodes}
    spent = {length: {} for length in lengths}  # length -> what -> summed difference
    tokens = dict.fromkeys(lengths, 0)
    rates = []
    for _ in range(repeats):
        for length in lengths:
            before = snapshot(processes, nodes)
            for prompt in prompts:
                result = client.generate(prompt, max_new_tokens=length, **generate).result()
                tokens[length] += len(result.token_ids)
                if length == lengths[-1]:
                    rates.append(result.tokens_per_s)
                progress.advance()
            after = snapshot(processes, nodes)
            for key, value in after.items():
                spent[length][key] = spent[length].get(key, 0.0) + value - before[key]
    short, long = lengths
    per_token = {key: (spent[long][key] - spent[short][key]) / (tokens[long] - tokens[short]) for key in spent[long]}
    hosting = {name: len(info.hosting) for name, info in node_infos(nodes).items()}
    return {"per_token": per_token, "hosting": hosting, "tokens_per_s": statistics.median(rates),
            "nodes": list(nodes)}


def snapshot(processes: dict[str, psutil.Process], nodes: dict[str, pb_grpc.NodeStub]) -> dict[str | tuple[str, str], float]:
    """name -> CPU seconds of the process so far; (node, field) -> its profile's counter."""
    out: dict = {name: sum(process.cpu_times()[:2]) for name, process in processes.items()}
    for name, info in node_infos(nodes).items():
        for field in PROFILE_FIELDS:
            out[(name, field)] = float(getattr(info.profile, field))
    return out


def node_infos(nodes: dict[str, pb_grpc.NodeStub]) -> dict[str, pb.NodeInfo]:
    return {name: stub.Info(pb.InfoRequest(), timeout=5.0) for name, stub in nodes.items()}


def figures(case: dict, single: dict, node_count: int) -> dict:
    """The ratios, the projection and each node's breakdown, from what measure_case measured."""
    per_token, nodes = case["per_token"], case["nodes"]
    cpu_ms = {name: per_token[name] * 1e3 for name in ("coordinator", *nodes)}
    busiest = max(nodes, key=lambda name: cpu_ms[name])
    total_ratio = sum(cpu_ms.values()) / single["cpu_ms_per_token"]
    node_ratio = cpu_ms[busiest] * node_count / single["cpu_ms_per_token"]
    return {
        "tokens_per_s": round(case["tokens_per_s"], 1),
        "cpu_ms_per_token": {name: round(ms, 4) for name, ms in cpu_ms.items()},
        "total_ratio": round(total_ratio, 2),
        "node_ratio": round(node_ratio, 2),
        "busiest_node": busiest,
        "projected_tokens_per_s": round(node_count / node_ratio * single["tokens_per_s"], 1),
        "breakdown_ms": {name: breakdown(per_token, name, case["hosting"][name]) for name in nodes},
        "stage_call_ms": {name: round(per_token[(name, "stage_s")] / per_token[(name, "stage_calls")] * 1e3, 4)
                          if per_token[(name, "stage_calls")] > 0 else None for name in nodes},
    }


def breakdown(per_token: dict, name: str, hosting: int) -> dict[str, float]:
    """A node's CPU per committed token (ms) by where it went. Stage time is split between passes whose
    positions were kept and those a flush threw away by the share of positions each had: every hosted
    stage must run each committed position once."""
    p = {field: per_token[(name, field)] for field in PROFILE_FIELDS}
    kept = min(1.0, hosting / p["stage_positions"]) if p["stage_positions"] > 0 else 1.0
    measured = p["stage_s"] + p["exit_s"] + p["guess_s"] + p["commit_s"]
    parts = (p["stage_s"] * kept, p["stage_s"] * (1 - kept), p["exit_s"], p["guess_s"], p["commit_s"], p["serialize_s"],
             max(0.0, p["worker_cpu_s"] - measured), max(0.0, p["process_cpu_s"] - p["worker_cpu_s"] - p["serialize_s"]))
    return {part: round(seconds * 1e3, 4) for part, seconds in zip(PARTS, parts)}


def format_cpu(report: dict) -> str:
    short, long = report["new_tokens"]
    lines = [f"CPU time per committed token, cluster {report['cluster']} ({report['bundle']}, {report['nodes']} nodes), "
             f"{report['prompts']} prompts decoded to {short} and to {long} tokens (the difference is counted), "
             f"ring window {report['window']}"]
    for temperature, single in report["single_process"].items():
        lines.append(f"  single process, {sampled(float(temperature))}: {single['cpu_ms_per_token']:.3f} ms per token, "
                     f"{single['tokens_per_s']:.1f} tokens/s")
    node_names = list(report["cases"][0]["breakdown_ms"]) if report["cases"] else []
    lines.append(f"  {'data path':<9} {'sampling':<9} {'mode':<11} {'tokens/s':>8} {'coord ms':>8} "
                 + " ".join(f"{name[:9]:>9}" for name in node_names)
                 + f" {'total':>6} {'node':>6} {'projection':>10}")
    for case in report["cases"]:
        cpu = case["cpu_ms_per_token"]
        sampling = "greedy" if not case["temperature"] else f"T={case['temperature']:g}"
        lines.append(f"  {case['data_path']:<9} {sampling:<9} {case['mode']:<11} {case['tokens_per_s']:>8.1f} "
                     f"{cpu['coordinator']:>8.3f} " + " ".join(f"{cpu[name]:>9.3f}" for name in node_names)
                     + f" {case['total_ratio']:>5.2f}x {case['node_ratio']:>5.2f}x {case['projected_tokens_per_s']:>10.1f}")
    lines.append("  total: all processes' CPU / the single process's; node: the busiest node's x nodes / the single "
                 "process's; projection: tokens/s that separate devices could reach with free links (PROJECTED)")
    lines.append(f"  where each node's CPU goes, ms per committed token (a stage call while one process decodes: "
                 f"{report['stage_call_one_process_ms']:.3f} ms; in the node: the 'call' column)")
    for case in report["cases"]:
        sampling = "greedy" if not case["temperature"] else f"T={case['temperature']:g}"
        lines.append(f"  {case['data_path']} {sampling} {case['mode']}:")
        for name, parts in case["breakdown_ms"].items():
            call = case["stage_call_ms"][name]
            shown = ", ".join(f"{part} {ms:.3f}" for part, ms in parts.items() if ms >= 0.0005)
            lines.append(f"    {name}: call {call:.3f} ms; {shown}" if call is not None else f"    {name}: {shown}")
    return "\n".join(lines)
