"""Shared fixtures: a tiny weight-shared model trained for a few steps and exported once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.config import ModelConfig
from runtime.train import TrainConfig

TINY = ModelConfig(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                   n_distinct_layers=2, n_stages=3, context_length=640)
TINY_TRAINING = TrainConfig(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup=5, precision="fp32", threads=2,
                             eval_windows=48)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from runtime.train import train

    out = tmp_path_factory.mktemp("tiny-run")
    train(out, TINY, TINY_TRAINING, resume=False)
    return out / "checkpoint.pt"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from runtime.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "tiny")


def run_speed(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `speed` command as a user would, in a separate process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A failed command said what is wrong in one line of stderr, without a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_cluster(directory: Path, *, bundle: Path | None = None, stages: list[list[int]] | None = None,
                  speculation: bool = True, extra_node_keys: str = "") -> Path:
    """A cluster file on free loopback ports: one node per entry of `stages` (default one stage each of three)."""
    stages = stages or [[0], [1], [2]]
    nodes = "".join(
        f"  - name: edge-{i + 1}\n    address: 127.0.0.1:{free_port()}\n    stages: {s}\n    threads: 1\n{extra_node_keys}"
        for i, s in enumerate(stages))
    path = directory / "cluster.yaml"
    path.write_text(
        f"cluster: test-{directory.name}\nbundle: {bundle if bundle is not None else 'null'}\n"
        f"coordinator:\n  address: 127.0.0.1:{free_port()}\n  heartbeat_interval_s: 0.5\n"
        f"speculation:\n  enabled: {str(speculation).lower()}\nnodes:\n{nodes}")
    return path
