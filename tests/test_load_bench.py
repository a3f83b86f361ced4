"""`speed bench FILE --clients N` end to end on loopback, its argument errors, and the pure helpers of both modes."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from runtime.bench.load import (
    KillWatch,
    Tally,
    failover_ms,
    format_chaos,
    format_load,
    load_report,
    parse_vm_rss,
    percentile,
    recovered,
    rss_mb,
    spread,
    trial_sampling,
)
from runtime.client import Unavailable
from runtime.core.node_state import NodeState
from runtime.core.sampling import GREEDY
from runtime.wire import speed_pb2 as pb
from runtime.wire.enums import to_wire
from tests.conftest import assert_one_line_error, run_speed, write_cluster
from tests.support import ports_free

HEADER = {"cluster": "c", "bundle": "demo-4x3", "nodes": 2, "temperature": 0.0}


def test_clients_reports_rates_latency_errors_and_memory_of_every_process_as_json(tmp_path, state_dir):
    """Sampled requests, as --temperature asks."""
    path = write_cluster(tmp_path)
    result = run_speed("bench", str(path), "--clients", "3", "--requests", "1", "--new-tokens", "8", "--temperature",
                       "0.8", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["temperature"] == 0.8
    assert set(report) == {"cluster", "bundle", "nodes", "temperature", "clients", "requests_per_client", "new_tokens",
                           "one_client_tokens_per_s", "clients_tokens_per_s", "scaling", "latency_p50_s",
                           "latency_p90_s", "latency_p99_s", "first_token_p50_s", "first_token_p90_s",
                           "first_token_p99_s", "requests", "errors", "first_error", "rss_mb"}
    assert (report["clients"], report["requests_per_client"], report["new_tokens"]) == (3, 1, 8)
    assert report["errors"] == 0 and report["first_error"] is None and report["requests"] == 1 + 3
    assert report["one_client_tokens_per_s"] > 0 and report["clients_tokens_per_s"] > 0 and report["scaling"] > 0
    assert 0 < report["latency_p50_s"] <= report["latency_p90_s"] <= report["latency_p99_s"]
    assert 0 < report["first_token_p50_s"] <= report["first_token_p90_s"] <= report["first_token_p99_s"]
    assert report["first_token_p50_s"] <= report["latency_p50_s"]
    assert set(report["rss_mb"]) == {"coordinator", "edge-1", "edge-2", "edge-3"}
    for rss in report["rss_mb"].values():
        assert 0 < rss["before"] <= rss["peak"] and 0 < rss["after"] <= rss["peak"]
    assert ports_free(path)


@pytest.mark.parametrize(("args", "fragments"), [
    (["--clients", "2"], ["--clients needs a cluster FILE"]),
    (["--chaos", "2"], ["--chaos needs a cluster FILE"]),
    (["deploy/local.yaml", "--clients", "0"], ["--clients", "must be at least 1"]),
    (["deploy/local.yaml", "--chaos", "two"], ["--chaos", "expected a whole number"]),
    (["deploy/local.yaml", "--clients", "2", "--chaos", "2"], ["--chaos", "not allowed with", "--clients"]),
    (["deploy/local.yaml", "--requests", "2"], ["--requests needs --clients"]),
    (["deploy/local.yaml", "--clients", "2", "--seed", "1"], ["--seed needs --chaos"]),
    (["--data-paths", "0,5"], ["--data-paths needs a cluster FILE"]),
    (["deploy/local.yaml", "--data-paths", "0,fast"], ["--data-paths", "give latencies in ms separated by commas"]),
    (["deploy/local.yaml", "--data-paths", "5", "--emulate-link-ms", "5"], ["--data-paths sets the link latencies"]),
    (["deploy/local.yaml", "--window", "4"], ["--window applies to --data-paths"]),
])
def test_argument_mistakes_get_one_line(args, fragments):
    assert_one_line_error(run_speed("bench", *args, timeout=60), *fragments)


def test_percentile_interpolates_and_is_none_without_values():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([float(i) for i in range(101)], 99) == pytest.approx(99.0)


def test_vm_rss_is_read_in_mb_and_zero_for_a_gone_process():
    assert parse_vm_rss("Name:\tpython\nVmRSS:\t  204800 kB\nThreads:\t4\n") == 200.0
    assert parse_vm_rss("Name:\tzombie\nState:\tZ (zombie)\n") == 0.0
    assert rss_mb(os.getpid()) > 0
    assert rss_mb(2**22 + 1) == 0.0  # above the kernel's largest pid


def test_load_report_counts_errors_of_both_phases_and_formats_them():
    one = (Tally(latencies_s=[1.0], tokens=48), 1.0)
    many = (Tally(latencies_s=[1.0, 2.0, 4.0], first_token_s=[0.1, 0.2, 0.3], tokens=144,
                  errors=["Unavailable: node down"]), 2.0)
    memory = {"coordinator": {"before": 80.04, "peak": 90.0, "after": 85.0}}
    report = load_report(HEADER, 4, 1, 48, one, many, memory)
    assert (report["one_client_tokens_per_s"], report["clients_tokens_per_s"], report["scaling"]) == (48.0, 72.0, 1.5)
    assert (report["latency_p50_s"], report["requests"], report["errors"]) == (2.0, 5, 1)
    assert (report["latency_p90_s"], report["first_token_p50_s"]) == (3.6, 0.2)
    assert report["first_error"] == "Unavailable: node down"
    assert report["rss_mb"]["coordinator"]["before"] == 80.0
    text = format_load(report)
    assert "4 clients" in text and "1.50x one client" in text and "errors 1 of 5 requests; first: Unavailable" in text
    assert "p90 3.600 s" in text and "to the first token p50 0.200 s  p90 0.280 s" in text
    assert "coordinator" in text.splitlines()[-1] and "90.0" in text.splitlines()[-1]


def test_a_load_where_every_request_failed_reports_no_rate_ratio_or_latency():
    report = load_report(HEADER, 2, 1, 8, (Tally(errors=["e1"]), 1.0), (Tally(errors=["e2", "e3"]), 1.0), {})
    assert (report["scaling"], report["latency_p50_s"], report["errors"], report["first_error"]) == (None, None, 3, "e1")
    assert report["first_token_p99_s"] is None
    assert "- one client" in format_load(report)


def test_failover_is_the_wait_for_the_next_chunk_and_the_longest_gap_after_the_kill():
    assert failover_ms(10.0, [10.001, 10.5, 10.51]) == pytest.approx((1.0, 499.0))
    assert failover_ms(10.0, []) == (None, None)
    assert failover_ms(None, [1.0]) == (None, None)


def test_spread_ignores_missing_values():
    assert spread([3.0, None, 1.0, 2.0]) == (2.0, 3.0)
    assert spread([None]) == (None, None)


def test_trials_alternate_greedy_and_sampling_seeded_with_the_trial():
    assert trial_sampling(0) == GREEDY
    sampled = trial_sampling(3)
    assert (sampled.temperature, sampled.top_k, sampled.seed) == (0.8, 40, 3)


class FakeStream:
    def __init__(self, chunks: int, fail: bool = False):
        self.chunks, self.fail = chunks, fail

    def __iter__(self):
        yield from range(self.chunks)
        if self.fail:
            raise Unavailable(None, "node edge-2 stopped answering")

    def result(self):
        return SimpleNamespace(token_ids=list(range(self.chunks)))


def test_the_kill_comes_after_the_drawn_chunk_and_the_later_chunks_are_timed():
    kills = []
    watch = KillWatch(2, lambda: kills.append(True))
    assert watch.follow(FakeStream(5)) == [0, 1, 2, 3, 4]
    assert kills == [True] and watch.mid_request and len(watch.arrivals) == 3
    assert all(t >= watch.killed_at for t in watch.arrivals)


def test_a_request_that_ends_before_the_drawn_chunk_is_killed_once_afterwards():
    kills = []
    watch = KillWatch(9, lambda: kills.append(True))
    watch.follow(FakeStream(3))
    assert not kills and not watch.mid_request
    watch.kill()
    watch.kill()
    assert kills == [True] and watch.arrivals == []


def test_a_failed_request_still_leaves_the_kill_time():
    watch = KillWatch(1, lambda: None)
    with pytest.raises(Unavailable):
        watch.follow(FakeStream(2, fail=True))
    assert watch.killed_at is not None and len(watch.arrivals) == 1


def status(*nodes: tuple[str, str, float], hosting: dict[str, list[int]] | None = None) -> pb.ClusterStatusReply:
    """Nodes edge-1, edge-2, ... with stage 0, 1, ... each, hosting their own unless `hosting` says otherwise."""
    stages = {name: [i] for i, (name, _, _) in enumerate(nodes)}
    running = {**stages, **(hosting or {})}
    return pb.ClusterStatusReply(nodes=[
        pb.NodeStatus(name=n, state=to_wire(NodeState(s), pb.NodeState), last_heartbeat_s=b, stages=stages[n],
                      hosting=running[n]) for n, s, b in nodes])


def test_recovered_needs_every_node_serving_its_own_stages_and_the_restarted_one_heard_from_since_the_kill():
    assert recovered(status(("edge-1", "serving", 0.2), ("edge-2", "serving", 0.1)), "edge-2", since_kill_s=3.0)
    assert not recovered(status(("edge-1", "serving", 0.2), ("edge-2", "down", 5.0)), "edge-2", since_kill_s=3.0)
    assert not recovered(status(("edge-1", "serving", 0.2), ("edge-2", "serving", 4.0)), "edge-2", since_kill_s=3.0)
    assert not recovered(status(("edge-1", "waiting", -1), ("edge-2", "serving", 0.1)), "edge-2", since_kill_s=3.0)
    assert not recovered(status(("edge-1", "serving", 0.2), ("edge-2", "serving", 0.1),
                                hosting={"edge-1": [0, 1], "edge-2": []}), "edge-2", since_kill_s=3.0)


def test_chaos_text_counts_identical_trials_and_shows_each_one():
    trial = {"trial": 0, "sampling": "greedy", "victim": "edge-2", "kill_after_chunk": 7, "killed_mid_request": True,
             "identical": False, "error": "Unavailable: node edge-2 stopped answering", "next_chunk_ms": 0.4,
             "longest_gap_ms": 0.4, "recovery_s": 0.61}
    report = {**HEADER, "trials": 2, "new_tokens": 24, "seed": 0, "completed_identical": 1, "failover_ms_median": 0.4,
              "failover_ms_max": 0.4, "longest_gap_ms_median": None, "longest_gap_ms_max": None,
              "results": [trial, {**trial, "trial": 1, "identical": True, "error": None, "next_chunk_ms": None}]}
    lines = format_chaos(report).splitlines()
    assert "killed edge-2 after chunk 7: NOT identical (Unavailable: node edge-2 stopped answering)" in lines[1]
    assert "identical; serving again in 0.61 s" in lines[2]
    assert lines[3] == "completed-identical 1 / 2"
    assert "median 0.4 ms" in lines[4] and "longest gap after the kill median -" in lines[4]
