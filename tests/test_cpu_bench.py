"""`speed bench FILE --cpu` end to end on loopback, its arithmetic, and its argument errors."""

from __future__ import annotations

import json

import pytest

from deploy.certs import init_certs
from runtime.bench.cpu import PARTS, breakdown, figures, format_cpu
from runtime.core.cluster_file import load_cluster
from tests.conftest import assert_one_line_error, run_speed, write_cluster
from tests.support import ports_free

PROFILE = {"process_cpu_s": 2.0e-3, "worker_cpu_s": 1.5e-3, "stage_s": 0.8e-3, "stage_calls": 2.0,
           "stage_positions": 2.0, "exit_s": 0.0, "guess_s": 0.2e-3, "commit_s": 0.0, "serialize_s": 0.1e-3}


def per_token(node_cpu: dict[str, float]) -> dict:
    """Per committed token: the processes' CPU and every node's profile (PROFILE, scaled by its CPU)."""
    out = {"coordinator": 0.5e-3, **node_cpu}
    for name, cpu in node_cpu.items():
        out |= {(name, field): value * cpu / 2.0e-3 for field, value in PROFILE.items()}
    return out


def test_a_node_that_ran_every_position_twice_threw_half_its_stage_time_away():
    parts = breakdown(per_token({"edge-1": 2.0e-3}), "edge-1", hosting=1)
    assert list(parts) == list(PARTS)
    assert parts["stage passes kept"] == parts["stage passes thrown away"] == 0.4
    assert parts["guess classifier"] == 0.2 and parts["serialization"] == 0.1
    assert parts["Python bookkeeping"] == pytest.approx(0.5)  # the worker's 1.5 less the 1.0 measured in it
    assert parts["gRPC and other threads"] == pytest.approx(0.4)  # 2.0 less the worker's 1.5 and serialization's 0.1
    assert sum(parts.values()) == pytest.approx(2.0)  # the whole process, once
    assert breakdown(per_token({"edge-1": 2.0e-3}), "edge-1", hosting=2)["stage passes thrown away"] == 0


def test_ratios_compare_the_busiest_node_and_all_processes_with_the_single_process():
    case = {"per_token": per_token({"edge-1": 1.0e-3, "edge-2": 2.0e-3}), "nodes": ["edge-1", "edge-2"],
            "hosting": {"edge-1": 1, "edge-2": 1}, "tokens_per_s": 100.0}
    result = figures(case, {"cpu_ms_per_token": 2.0, "tokens_per_s": 500.0}, node_count=2)
    assert result["busiest_node"] == "edge-2"
    assert result["total_ratio"] == 1.75  # (0.5 + 1 + 2) / 2
    assert result["node_ratio"] == 2.0  # 2 ms x 2 nodes / 2 ms
    assert result["projected_tokens_per_s"] == 500.0  # 2 nodes / 2.0 x 500
    assert result["stage_call_ms"] == {"edge-1": 0.4, "edge-2": 0.4}  # stage time over stage calls


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_cpu_reports_every_process_and_where_each_node_spends_per_token(tmp_path, state_dir, secure):
    """A secure cluster's nodes answer only their coordinator: the bench reads them with its certificate."""
    path = write_cluster(tmp_path, extra_top_keys="security:\n  certs: certs\n" if secure else "")
    if secure:
        spec = load_cluster(path)
        init_certs(spec.security.certs, spec)
    result = run_speed("bench", str(path), "--cpu", "ring", "--temperature", "0", "--new-tokens", "32", "--repeats", "1",
                       "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["new_tokens"] == [8, 32] and report["nodes"] == 3
    assert report["single_process"]["0.0"]["cpu_ms_per_token"] > 0 and report["stage_call_one_process_ms"] > 0
    assert [(case["data_path"], case["temperature"], case["mode"]) for case in report["cases"]] == [
        ("ring", 0.0, "sequential"), ("ring", 0.0, "speculative")]
    for case in report["cases"]:
        cpu = case["cpu_ms_per_token"]
        assert set(cpu) == {"coordinator", "edge-1", "edge-2", "edge-3"} and all(ms > 0 for ms in cpu.values())
        assert case["node_ratio"] == pytest.approx(cpu[case["busiest_node"]] * 3 / report["single_process"]["0.0"][
            "cpu_ms_per_token"], rel=0.01)
        parts = case["breakdown_ms"]
        for name in ("edge-1", "edge-2", "edge-3"):
            assert parts[name]["stage passes kept"] > 0 and case["stage_call_ms"][name] > 0
            # the node's own counters account for about what the operating system saw it spend
            assert 0.5 * cpu[name] < sum(parts[name].values()) < 2 * cpu[name]
        assert parts["edge-3"]["last-stage classifier"] > 0 and parts["edge-1"]["last-stage classifier"] == 0
        guessing = case["mode"] == "speculative"
        assert (parts["edge-1"]["guess classifier"] > 0) == guessing
        assert (parts["edge-2"]["guess classifier"] > 0) == guessing
    assert "node" in format_cpu(report) and "PROJECTED" in format_cpu(report)
    assert ports_free(path)


@pytest.mark.parametrize(("args", "fragments"), [
    (["--cpu"], ["--cpu needs a cluster FILE"]),
    (["deploy/local.yaml", "--cpu", "star"], ["--cpu", "give data paths separated by commas", "lockstep, ring"]),
    (["deploy/local.yaml", "--cpu", "--clients", "2"], ["--cpu is a benchmark of its own", "--clients"]),
    (["deploy/local.yaml", "--cpu", "--emulate-link-ms", "5"], ["--cpu is a benchmark of its own", "--emulate-link-ms"]),
])
def test_argument_mistakes_get_one_line(args, fragments):
    assert_one_line_error(run_speed("bench", *args, timeout=60), *fragments)
