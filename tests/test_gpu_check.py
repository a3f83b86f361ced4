"""The device check (`make gpu-check`) runs where a GPU is lent for a few minutes, so it must work the first time it
gets there: on the CPU it runs every one of its steps, the cluster of three nodes included, and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.cluster  # it starts the speed command, a cluster and pytest itself

STEPS = {"tests", "graph_capture", "bench_reference_cpu", "bench_local_cpu", "bench_cluster"}


def test_the_device_check_runs_every_step_on_the_cpu_and_writes_one_report(tmp_path):
    out = tmp_path / "gpu-check.json"
    done = subprocess.run([sys.executable, "-m", "deploy.gpu_check", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    assert "CPUExecutionProvider" in report["machine"]["onnxruntime"]["providers"]
    failed = {name: step for name, step in report.items() if name in STEPS and step["rc"] != 0}
    assert STEPS <= report.keys() and not failed, failed
    assert report["graph_capture"]["result"] == {"provider": "CPUExecutionProvider", "cuda_graphs": False}
    assert {name: tokens["all_equal"] for name, tokens in report["tokens"].items()} == \
           {"greedy": True, "sampled": True, "sampled, top-k": True}
    for bench in ("bench_reference_cpu", "bench_local_cpu", "bench_cluster"):
        assert isinstance(report[bench]["result"], dict), bench  # the bench's own JSON, read back
