"""`speed bench FILE --clients N` and `speed bench FILE --chaos N`: a cluster started here, under load and under failure.

--clients: does the cluster scale with concurrent requests, how long does a request take under load, and does
every process give its memory back afterwards? One client's aggregate rate is measured, then N concurrent
clients' (threads, one Client each), with per-request latency, errors and the resident memory (VmRSS) of every
process before the load, at its peak (sampled in a background thread) and after it.
--chaos: does a request survive losing a node? In each trial a random node process is SIGKILLed while a request
streams; its tokens are compared with the single-process reference, the failover cost is timed from the kill,
and the node is restarted (and re-registered) before the next trial. Kills are drawn from a seeded random
generator, so runs are repeatable.

Requests ignore EOS so every one decodes the same number of tokens; each has a timeout and every loop is bounded.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deploy.launcher import LocalCluster
from runtime.bench.cluster import CHAT_PROMPTS
from runtime.bench.local import LOCAL_PROMPTS, sampled
from runtime.client import Client, ClientError, GenerationStream
from runtime.core.bundle import Bundle, load_bundle
from runtime.core.errors import SpeedError
from runtime.core.node_state import NodeState
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.wire import speed_pb2 as pb
from runtime.wire.enums import node_state_of

REQUEST_TIMEOUT_S = 300.0
RSS_INTERVAL_S = 0.1
SETTLE_S = 1.0  # after the last request, before memory is read again
LATENCY_PERCENTILES = (50, 90, 99)  # of the concurrent clients' requests, whole and to the first chunk
RECOVERY_TIMEOUT_S = 120.0  # for a restarted node to register again
POLL_S = 0.2
WARM_UP_TOKENS = 8
SAMPLED = {"temperature": 0.8, "top_k": 40}  # odd trials sample with these, seeded with the trial's index


@dataclass(frozen=True)
class Workload:
    prompts: tuple[str, ...]
    chat: bool
    new_tokens: int
    sampling: SamplingParams = GREEDY  # unless a request asks otherwise

    def prompt(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]

    def generate(self, client: Client, index: int, sampling: SamplingParams | None = None,
                 new_tokens: int | None = None) -> GenerationStream:
        sampling = sampling or self.sampling
        return client.generate(self.prompt(index), max_new_tokens=new_tokens or self.new_tokens,
                               temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                               seed=sampling.seed, ignore_eos=True, chat=self.chat, timeout_s=REQUEST_TIMEOUT_S)


def workload_of(bundle: Bundle, new_tokens: int, sampling: SamplingParams = GREEDY) -> Workload:
    """The prompts `speed bench FILE` uses: user messages for an instruction-tuned chat model."""
    chat = bundle.answers_questions
    return Workload(CHAT_PROMPTS if chat else LOCAL_PROMPTS, chat, new_tokens, sampling)


def describe(cluster: LocalCluster, bundle: Bundle) -> dict:
    return {"cluster": cluster.spec.name, "bundle": bundle.manifest["name"], "nodes": len(cluster.spec.nodes)}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


def rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ---- memory ----

def parse_vm_rss(status_text: str) -> float:
    """MB (2**20 bytes) from the text of /proc/PID/status; 0 when it has no VmRSS line (a zombie)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # the kernel gives kB
    return 0.0


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB; 0 once it is gone."""
    try:
        return parse_vm_rss(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0.0


def rss_of(pids: dict[str, int]) -> dict[str, float]:
    return {name: rss_mb(pid) for name, pid in pids.items()}


class PeakRss:
    """While entered, samples every process's RSS each RSS_INTERVAL_S in a background thread; `peak` per name."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.peak = rss_of(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        for name, mb in rss_of(self.pids).items():
            self.peak[name] = max(self.peak[name], mb)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ---- --clients ----

@dataclass
class Tally:
    """What a set of requests gave: the latency of each completed one and of its first chunk of tokens, tokens
    generated, error sentences."""

    latencies_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + len(self.errors)

    @classmethod
    def merged(cls, tallies: Iterable[Tally]) -> Tally:
        total = cls()
        for tally in tallies:
            total.latencies_s += tally.latencies_s
            total.first_token_s += tally.first_token_s
            total.tokens += tally.tokens
            total.errors += tally.errors
        return total


def run_client(cluster: LocalCluster, workload: Workload, first: int, count: int, new_tokens: int | None = None,
               progress: Progress = NO_PROGRESS) -> Tally:
    """One client doing `count` requests in turn, prompts cycled from index `first`."""
    tally = Tally()
    with Client(cluster.endpoint, credentials=cluster.credentials()) as client:
        for index in range(first, first + count):
            started, first_chunk = time.perf_counter(), None
            try:
                stream = workload.generate(client, index, new_tokens=new_tokens)
                for _ in stream:
                    if first_chunk is None:
                        first_chunk = time.perf_counter()
                result = stream.result()
            except ClientError as exc:
                tally.errors.append(f"{type(exc).__name__}: {exc}")
            else:
                tally.latencies_s.append(time.perf_counter() - started)
                if first_chunk is not None:
                    tally.first_token_s.append(first_chunk - started)
                tally.tokens += len(result.token_ids)
            progress.advance()
    return tally


def run_clients(cluster: LocalCluster, workload: Workload, clients: int, requests: int,
                new_tokens: int | None = None, progress: Progress = NO_PROGRESS) -> tuple[Tally, float]:
    """`clients` concurrent clients (one thread and one Client each); the merged tally and the wall time."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients, thread_name_prefix="bench-client") as pool:
        tallies = list(pool.map(lambda c: run_client(cluster, workload, c * requests, requests, new_tokens, progress),
                                range(clients)))
    return Tally.merged(tallies), time.perf_counter() - started


def bench_load(cluster_path: Path, *, clients: int, requests: int = 3, new_tokens: int = 48,
               emulated_link_ms: float | None = None, sampling: SamplingParams = GREEDY,
               progress: Progress = NO_PROGRESS) -> dict:
    cluster = LocalCluster(cluster_path, emulated_link_ms=emulated_link_ms, progress=progress)
    bundle = load_bundle(cluster.spec.bundle)
    workload = workload_of(bundle, new_tokens, sampling)
    with cluster:
        run_clients(cluster, workload, clients, 1, new_tokens=WARM_UP_TOKENS)  # warm-up, as concurrent
        pids = {name: process.pid for name, process in cluster.processes.items()}
        before = rss_of(pids)
        with PeakRss(pids) as sampler, progress.task("requests", total=requests + clients * requests):
            one, one_s = run_clients(cluster, workload, 1, requests, progress=progress)
            many, many_s = run_clients(cluster, workload, clients, requests, progress=progress)
        time.sleep(SETTLE_S)
        after = rss_of(pids)
    memory = {name: {"before": before[name], "peak": max(sampler.peak[name], after[name]), "after": after[name]}
              for name in pids}
    header = describe(cluster, bundle) | {"temperature": sampling.temperature}
    return load_report(header, clients, requests, new_tokens, (one, one_s), (many, many_s), memory)


def load_report(header: dict, clients: int, requests: int, new_tokens: int, one: tuple[Tally, float],
                many: tuple[Tally, float], memory: dict[str, dict[str, float]]) -> dict:
    one_rate, many_rate = (tally.tokens / seconds for tally, seconds in (one, many))
    errors = one[0].errors + many[0].errors
    return {
        **header,
        "clients": clients,
        "requests_per_client": requests,
        "new_tokens": new_tokens,
        "one_client_tokens_per_s": round(one_rate, 1),
        "clients_tokens_per_s": round(many_rate, 1),
        "scaling": round(many_rate / one_rate, 2) if one_rate else None,
        **{f"{what}_p{q}_s": rounded(percentile(values, q), 3)
           for what, values in (("latency", many[0].latencies_s), ("first_token", many[0].first_token_s))
           for q in LATENCY_PERCENTILES},
        "requests": one[0].requests + many[0].requests,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "rss_mb": {name: {when: round(mb, 1) for when, mb in rss.items()} for name, rss in memory.items()},
    }


def format_load(report: dict) -> str:
    scaling = "-" if report["scaling"] is None else f"{report['scaling']:.2f}x"
    def latency(what: str) -> str:
        if report[f"{what}_p50_s"] is None:
            return "-"
        return "  ".join(f"p{q} {report[f'{what}_p{q}_s']:.3f} s" for q in LATENCY_PERCENTILES)

    lines = [
        f"cluster {report['cluster']} ({report['bundle']}, {report['nodes']} nodes): {report['requests_per_client']} "
        f"request(s) of {report['new_tokens']} new tokens per client, {sampled(report['temperature'])}, EOS ignored",
        f"  {'1 client':12}{report['one_client_tokens_per_s']:8.1f} tokens/s",
        f"  {str(report['clients']) + ' clients':12}{report['clients_tokens_per_s']:8.1f} tokens/s   {scaling} one client; "
        f"latency per request {latency('latency')}; to the first token {latency('first_token')}",
        f"  errors {report['errors']} of {report['requests']} requests"
        + (f"; first: {report['first_error']}" if report["first_error"] else ""),
        f"  resident memory (MB) {'before':>9} {'peak':>9} {'after':>9}",
    ]
    lines += [f"    {name:18} {rss['before']:9.1f} {rss['peak']:9.1f} {rss['after']:9.1f}"
              for name, rss in report["rss_mb"].items()]
    return "\n".join(lines)


# ---- --chaos ----

def trial_sampling(index: int) -> SamplingParams:
    """Even trials greedy, odd ones sampled, seeded with the trial's index."""
    return GREEDY if index % 2 == 0 else SamplingParams(**SAMPLED, seed=index)


def failover_ms(killed_at: float | None, arrivals: Sequence[float]) -> tuple[float | None, float | None]:
    """From the kill: the wait for the next chunk, and the longest wait for any chunk (a chunk already on its way
    when the node died arrives at once; the longest gap then shows the stall); None without a chunk after it."""
    if killed_at is None or not arrivals:
        return None, None
    times = [killed_at, *arrivals]
    return (arrivals[0] - killed_at) * 1000, max(b - a for a, b in zip(times, times[1:])) * 1000


class KillWatch:
    """Follows a stream and kills the victim after its `kill_after`-th chunk, timing the chunks that come after."""

    def __init__(self, kill_after: int, kill: Callable[[], None]):
        self.kill_after = kill_after
        self._kill = kill
        self.chunks = 0
        self.killed_at: float | None = None
        self.mid_request = False  # killed while the request was still streaming
        self.arrivals: list[float] = []

    def follow(self, stream: GenerationStream) -> list[int]:
        for _ in stream:
            if self.killed_at is not None:
                self.arrivals.append(time.perf_counter())
            self.chunks += 1
            if self.chunks == self.kill_after:
                self.mid_request = True
                self.kill()
        return stream.result().token_ids

    def kill(self) -> None:
        if self.killed_at is None:
            self._kill()
            self.killed_at = time.perf_counter()


def kill_node(cluster: LocalCluster, name: str) -> None:
    process = cluster.processes[name]
    process.kill()  # SIGKILL: no goodbye to the coordinator
    process.wait()


def recovered(status: pb.ClusterStatusReply, restarted: str, since_kill_s: float) -> bool:
    """Every node serving its own stages, the restarted one heard from since the kill (not a dead process still
    thought serving)."""
    node = next(n for n in status.nodes if n.name == restarted)
    home = all(node_state_of(n) == NodeState.SERVING and list(n.hosting) == list(n.stages) for n in status.nodes)
    return home and 0 <= node.last_heartbeat_s < since_kill_s


def restart_node(cluster: LocalCluster, client: Client, name: str, killed_at: float) -> float:
    """Start the killed node again and wait until the coordinator serves with it; the seconds that took."""
    started = time.perf_counter()
    cluster.start_process(name)
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while not recovered(client.status(), name, time.perf_counter() - killed_at):
        cluster.check_alive()
        if time.monotonic() > deadline:
            raise SpeedError(f"node {name} was not serving again {RECOVERY_TIMEOUT_S:g} s after its restart; "
                             f"see the logs in {cluster.logs}")
        time.sleep(POLL_S)
    return time.perf_counter() - started


def chaos_trial(cluster: LocalCluster, client: Client, workload: Workload, reference: Callable[[int, SamplingParams],
                list[int]], rng: random.Random, index: int) -> dict:
    """One generation with a node killed after a random number of chunks, then the node restarted."""
    sampling = trial_sampling(index)
    kill_after = rng.randint(1, max(1, workload.new_tokens // 2))
    victim = rng.choice([node.name for node in cluster.spec.nodes])  # uniform; the coordinator is never killed
    watch = KillWatch(kill_after, lambda: kill_node(cluster, victim))
    token_ids, error = None, None
    try:
        token_ids = watch.follow(workload.generate(client, index, sampling))
    except ClientError as exc:
        error = f"{type(exc).__name__}: {exc}"
    watch.kill()  # when the request ended first, so every trial restarts a node
    next_chunk, longest_gap = failover_ms(watch.killed_at, watch.arrivals)
    recovery_s = restart_node(cluster, client, victim, watch.killed_at)
    return {"trial": index, "sampling": "greedy" if sampling.greedy else "sampled", "victim": victim,
            "kill_after_chunk": watch.kill_after, "killed_mid_request": watch.mid_request,
            "identical": token_ids == reference(index, sampling), "error": error,
            "next_chunk_ms": rounded(next_chunk, 1), "longest_gap_ms": rounded(longest_gap, 1),
            "recovery_s": round(recovery_s, 2)}


def reference_of(bundle: Bundle, workload: Workload) -> Callable[[int, SamplingParams], list[int]]:
    """The single-process reference's tokens for a prompt index and sampling, with EOS ignored like the requests."""
    model = open_stage_model(bundle, threads=1)
    tokenizer = bundle.tokenizer()

    def generate(index: int, sampling: SamplingParams) -> list[int]:
        ids = tokenizer.encode(bundle.prompt_text(workload.prompt(index), chat=workload.chat)).ids
        return generate_plain(model, ids, max_new_tokens=workload.new_tokens, eos_id=-1, sampling=sampling).token_ids

    return generate


def bench_chaos(cluster_path: Path, *, trials: int, new_tokens: int = 48, seed: int = 0,
                emulated_link_ms: float | None = None, progress: Progress = NO_PROGRESS) -> dict:
    cluster = LocalCluster(cluster_path, emulated_link_ms=emulated_link_ms, progress=progress)
    bundle = load_bundle(cluster.spec.bundle)
    workload = workload_of(bundle, new_tokens)
    reference = reference_of(bundle, workload)
    rng = random.Random(seed)
    results = []
    with (cluster, Client(cluster.endpoint, credentials=cluster.credentials()) as client,
          progress.task("trials", total=trials)):
        workload.generate(client, 0, new_tokens=WARM_UP_TOKENS).result()
        for index in range(trials):
            results.append(chaos_trial(cluster, client, workload, reference, rng, index))
            progress.advance()
    return chaos_report(describe(cluster, bundle), new_tokens, seed, results)


def spread(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Median and maximum of the values that are not None; (None, None) when there are none."""
    present = [v for v in values if v is not None]
    return (statistics.median(present), max(present)) if present else (None, None)


def chaos_report(header: dict, new_tokens: int, seed: int, results: list[dict]) -> dict:
    next_median, next_max = spread(r["next_chunk_ms"] for r in results)
    gap_median, gap_max = spread(r["longest_gap_ms"] for r in results)
    return {
        **header,
        "trials": len(results),
        "new_tokens": new_tokens,
        "seed": seed,
        "completed_identical": sum(r["identical"] for r in results),
        "failover_ms_median": rounded(next_median, 1),
        "failover_ms_max": rounded(next_max, 1),
        "longest_gap_ms_median": rounded(gap_median, 1),
        "longest_gap_ms_max": rounded(gap_max, 1),
        "results": results,
    }


def format_trial(r: dict) -> str:
    if r["identical"]:
        outcome = "identical"
    else:
        outcome = f"NOT identical ({r['error']})" if r["error"] else "NOT identical (completed, different tokens)"
    timing = ("" if r["next_chunk_ms"] is None
              else f"; next chunk {r['next_chunk_ms']:.1f} ms, longest gap {r['longest_gap_ms']:.1f} ms")
    when = f"after chunk {r['kill_after_chunk']}" if r["killed_mid_request"] else "after the request ended"
    return (f"  trial {r['trial']:<3d} {r['sampling']:7} killed {r['victim']} {when}: {outcome}{timing}; "
            f"serving again in {r['recovery_s']:.2f} s")


def format_chaos(report: dict) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    lines = [
        f"cluster {report['cluster']} ({report['bundle']}, {report['nodes']} nodes): {report['trials']} generation(s) "
        f"of {report['new_tokens']} new tokens, a node SIGKILLed during each (seed {report['seed']})",
        *(format_trial(r) for r in report["results"]),
        f"completed-identical {report['completed_identical']} / {report['trials']}",
        f"failover (kill to next chunk) median {ms(report['failover_ms_median'])}, max {ms(report['failover_ms_max'])}; "
        f"longest gap after the kill median {ms(report['longest_gap_ms_median'])}, max {ms(report['longest_gap_ms_max'])}",
    ]
    return "\n".join(lines)
