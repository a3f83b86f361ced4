"""`speed up`, `speed down` and `speed bench FILE` as an operator runs them: real processes on loopback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from deploy.launcher import PROCESSES_FILE, STOP_TIMEOUT_S, stop_pids
from runtime.core.cluster_file import load_cluster, parse_address
from tests.conftest import HAS_GPU, assert_one_line_error, run_speed, write_cluster
from tests.support import ports_free

pytestmark = pytest.mark.usefixtures("state_dir")  # each test's clusters keep their state in its directory


def test_up_detach_serves_until_down_stops_every_process(tmp_path):
    path = write_cluster(tmp_path)
    started = run_speed("up", str(path), "--detach")
    assert started.returncode == 0, started.stderr
    endpoint = load_cluster(path).coordinator.address
    assert f"coordinator at {endpoint}" in started.stdout
    try:
        again = run_speed("up", str(path), "--detach")
        assert_one_line_error(again, "already up", "speed down")
        generated = run_speed("generate", "--coordinator", endpoint, "--max-new-tokens", "4", "--json", "Enter")
        assert generated.returncode == 0 and len(json.loads(generated.stdout)["token_ids"]) == 4
    finally:
        stopped = run_speed("down", str(path))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert ports_free(path)
    assert "not up" in run_speed("down", str(path)).stdout


def up_in_the_foreground(path) -> subprocess.Popen:
    """`speed up FILE` without --detach, returned once it says the cluster serves."""
    up = subprocess.Popen([sys.executable, "-m", "runtime.cli", "up", str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    for line in up.stdout:
        if "Ctrl-C" in line:
            break
    return up


def test_up_in_the_foreground_stops_everything_on_ctrl_c(tmp_path):
    path = write_cluster(tmp_path)
    up = up_in_the_foreground(path)
    try:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            run_speed("down", str(path))  # whatever the launcher left behind
    assert "stopped" in up.stdout.read()
    assert ports_free(path)


def test_speed_down_stops_a_cluster_started_in_the_foreground(tmp_path):
    path = write_cluster(tmp_path)
    up = up_in_the_foreground(path)
    try:
        down = run_speed("down", str(path))
        assert down.returncode == 0 and "Traceback" not in down.stderr, down.stderr
        assert up.wait(timeout=30) == 0, up.stderr.read()
    finally:
        if up.poll() is None:
            up.kill()
    assert "stopped" in up.stdout.read()
    assert ports_free(path)


def test_a_stage_given_to_two_nodes_is_named_before_anything_starts(tmp_path, state_dir):
    path = write_cluster(tmp_path, stages=[[0], [1], [1, 2]])
    assert_one_line_error(run_speed("up", str(path)), "nodes[2].stages: stage 1 is already hosted by edge-2")
    assert not state_dir.exists() or not list(state_dir.rglob("*.log"))


def test_a_malformed_cluster_file_starts_nothing(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("cluster: x\nnodes: [\n")
    assert_one_line_error(run_speed("up", str(path)), str(path), "not valid YAML")


def test_an_address_already_taken_is_named_before_anything_starts(tmp_path):
    path = write_cluster(tmp_path)
    taken = load_cluster(path).nodes[1].address
    with socket.socket() as holder:
        holder.bind(parse_address(taken))
        holder.listen()
        assert_one_line_error(run_speed("up", str(path)), taken, "edge-2", "not free")
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").rglob("processes.json"))


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the refusal cannot be observed")
def test_a_cuda_node_without_cuda_refuses_to_start_and_says_why(tmp_path):
    path = write_cluster(tmp_path, extra_node_keys="    device: cuda\n")
    result = run_speed("up", str(path))
    assert_one_line_error(result, "exited", "device cuda was requested")
    assert ports_free(path)


def test_bench_on_a_cluster_file_reports_both_modes_and_the_speedup(tmp_path):
    path = write_cluster(tmp_path)
    result = run_speed("bench", str(path), "--repeats", "1", "--new-tokens", "8", "--json", "--emulate-link-ms", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sequential_tokens_per_s"] > 0 and report["speculative_tokens_per_s"] > 0
    assert report["speedup"] == pytest.approx(report["speculative_tokens_per_s"] / report["sequential_tokens_per_s"],
                                              abs=0.01)
    assert set(report["emulated_link_ms"].values()) == {1.0}
    assert ports_free(path)


def test_a_cuda_node_allowed_to_fall_back_serves_on_cpu_and_the_file_can_turn_speculation_off(tmp_path):
    path = write_cluster(tmp_path, speculation=False, extra_node_keys="    device: cuda\n    cpu_fallback: true\n")
    assert run_speed("up", str(path), "--detach").returncode == 0
    try:
        endpoint = load_cluster(path).coordinator.address
        generated = run_speed("generate", "--coordinator", endpoint, "--max-new-tokens", "4", "--json", "Enter")
        assert generated.returncode == 0, generated.stderr
        result = json.loads(generated.stdout)
        assert result["provider"] == "CPUExecutionProvider"
        assert result["speculative"] is False  # the cluster file's default when the request does not say
    finally:
        run_speed("down", str(path))


def test_speed_down_stops_a_cluster_that_is_still_starting(tmp_path):
    """The record of processes is written as each one starts, so `speed down` finds them before the nodes serve."""
    path = write_cluster(tmp_path)
    up = subprocess.Popen([sys.executable, "-m", "runtime.cli", "up", str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        record = load_cluster(path).state_dir / PROCESSES_FILE
        deadline = time.monotonic() + 60
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert record.exists(), "speed up recorded no process"
        down = run_speed("down", str(path))
        assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            run_speed("down", str(path))
    assert up.returncode == 0 and "stopped while it was starting" in out and "Traceback" not in err, (out, err)
    assert ports_free(path)


def test_a_process_that_exited_is_stopped_before_its_parent_collects_it():
    """A detached cluster's processes are children of the system's first process, which may collect them seconds
    after they exit (or, in a container, never): `speed down` must not wait for that."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, time; child = subprocess.Popen(['true']); "
                               "print(child.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())  # not a child of this process, and never collected by its own
        deadline = time.monotonic() + 10
        while open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        started = time.monotonic()
        stop_pids([pid])
        assert time.monotonic() - started < STOP_TIMEOUT_S / 2
    finally:
        parent.kill()
        parent.wait()
