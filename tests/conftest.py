"""Shared fixtures: a tiny weight-shared model trained for a few steps and exported once."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.core.config import ModelConfig
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.wire.cluster_secret import write_secret

HAS_GPU = shutil.which("nvidia-smi") is not None  # tests of the CUDA refusal cannot run where CUDA is real

TINY = ModelConfig(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                   n_distinct_layers=2, n_stages=3, context_length=640)


@pytest.fixture(scope="session", autouse=True)
def trace_cache(tmp_path_factory) -> Iterator[Path]:
    """Traces kept for this run only, by every export and `speed` process it starts: the first export of an
    architecture traces it whatever this machine kept before, and the later ones bind their weights into it."""
    root = tmp_path_factory.mktemp("traces")
    with pytest.MonkeyPatch.context() as session_patch:
        session_patch.setenv("SPEED_TRACE_CACHE", str(root))
        yield root


def tiny_training():
    """The tiny model's training settings (importing torch only where a test trains: a GPU machine may lack it)."""
    from runtime.models.train import TrainConfig

    return TrainConfig(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup=5, precision="fp32", threads=2,
                       eval_windows=48)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from runtime.models.train import train

    out = tmp_path_factory.mktemp("tiny-run")
    train(out, TINY, tiny_training(), resume=False)
    return out / "checkpoint.pt"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from runtime.models.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def older_tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model exported as versions before the fused rotary embedding exported it: the rotary embedding in
    plain operators, so that a CPU runs the bundle's own attention (the demo bundle was such an export)."""
    from runtime.models import decoder
    from runtime.models.export import export_bundle

    def plain_rotary(x, positions, cos_table, sin_table):
        return decoder.apply_rotary(x, cos_table[positions][:, None], sin_table[positions][:, None])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoder, "rotate_at_positions", plain_rotary)
        patch.setenv("SPEED_TRACE_CACHE", str(tmp_path_factory.mktemp("older-traces")))  # not the traces kept
        return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "older")


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


_HANDED_OUT: set[int] = set()  # ports free_port gave already: the system may offer one again once released


def free_port() -> int:
    """A loopback port free now and not given before in this run, so one cluster file never repeats a port."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def write_cluster(directory: Path, *, bundle: Path | None = None, stages: list[list[int]] | None = None,
                  speculation: bool = True, extra_node_keys: str = "", extra_coordinator_keys: str = "",
                  metrics: bool = False, standby_stages: dict[int, list[int]] | None = None,
                  extra_top_keys: str = "", secret_file: bool = True) -> Path:
    """A cluster file on free loopback ports: one node per entry of `stages` (default one stage each of three);
    metrics: every process serves Prometheus metrics on a port of its own; standby_stages: by node index;
    secret_file: the cluster's secret in a file beside it (else in the state directory, as by default)."""
    stages = stages if stages is not None else [[0], [1], [2]]
    standby = standby_stages or {}

    def metrics_port(indent: str) -> str:
        return f"{indent}metrics_port: {free_port()}\n" if metrics else ""

    nodes = "".join(
        f"  - name: edge-{i + 1}\n    address: 127.0.0.1:{free_port()}\n    stages: {s}\n    threads: 1\n"
        f"{metrics_port('    ')}{f'    standby_stages: {standby[i]}{chr(10)}' if i in standby else ''}{extra_node_keys}"
        for i, s in enumerate(stages))
    path = directory / "cluster.yaml"
    if secret_file:
        write_secret(directory / "cluster.secret")
    path.write_text(
        f"cluster: test-{directory.name}\nbundle: {bundle if bundle is not None else 'null'}\n"
        f"{'secret_file: cluster.secret' + chr(10) if secret_file else ''}"
        f"coordinator:\n  address: 127.0.0.1:{free_port()}\n  heartbeat_interval_s: 0.5\n"
        f"{metrics_port('  ')}{extra_coordinator_keys}"
        f"{extra_top_keys}speculation:\n  enabled: {str(speculation).lower()}\nnodes:\n{nodes}")
    return path


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> Path:
    """$SPEED_STATE_DIR for this test only (restored after it): what a LocalCluster or `speed up` writes, logs
    and process files, stays under the test's own directory."""
    path = tmp_path / "state"
    monkeypatch.setenv("SPEED_STATE_DIR", str(path))
    return path


@contextlib.contextmanager
def running_cluster(directory: Path, *, make_certs: bool = False, **cluster_options) -> Iterator:
    """A LocalCluster of a cluster file written by write_cluster, its state kept under `directory`;
    make_certs: the certificates its security section names are made first."""
    from deploy.certs import init_certs
    from deploy.launcher import LocalCluster
    from runtime.core.cluster_file import load_cluster

    path = write_cluster(directory, **cluster_options)
    if make_certs:
        spec = load_cluster(path)
        init_certs(spec.security.certs, spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPEED_STATE_DIR", str(directory / "state"))
        with LocalCluster(path) as cluster:
            yield cluster


# --- the shipped demo model through a cluster, and what plain decoding in one process gives ----------------

CLUSTER_PROMPTS = [
    "ROMEO. But soft, what light through yonder window breaks?",
    "KING HENRY. Once more unto the breach, dear friends,",
    "Enter a Messenger.",
    "LADY MACBETH. Out, damned spot!",
]
CLUSTER_NEW_TOKENS = 32


@pytest.fixture(scope="session")
def reference():
    """reference(prompt, sampling, max_new_tokens, stop) -> the demo model's token ids, decoded plainly."""
    from runtime.core.bundle import load_bundle
    from runtime.core.stopping import StopStrings
    from runtime.local.backends import open_stage_model
    from runtime.local.plain import generate_plain

    bundle = load_bundle()
    model = open_stage_model(bundle)
    tokenizer = bundle.tokenizer()

    @functools.cache
    def generate(prompt: str, sampling: SamplingParams = GREEDY, max_new_tokens: int = CLUSTER_NEW_TOKENS,
                 stop: tuple[str, ...] = ()) -> list[int]:
        stop_strings = StopStrings(tokenizer, list(stop))
        return generate_plain(model, tokenizer.encode(prompt).ids, max_new_tokens=max_new_tokens,
                              eos_id=bundle.eos_token_id, sampling=sampling, should_stop=stop_strings or None).token_ids

    return generate


@pytest.fixture(scope="session")
def serving_cluster(tmp_path_factory):
    """The demo model on a ring cluster that also serves the OpenAI-compatible API (its URL: http_url)."""
    extra = f"  http_address: 127.0.0.1:{free_port()}\n"
    with running_cluster(tmp_path_factory.mktemp("serving"), extra_coordinator_keys=extra,
                         extra_top_keys="data_path: ring\n") as cluster:
        cluster.http_url = f"http://{cluster.spec.coordinator.http_address}"
        yield cluster


@contextlib.contextmanager
def decoding(client, prompts: list[str], max_new_tokens: int) -> Iterator[dict[int, list[int]]]:
    """A request per prompt, each on a thread of its own; the block runs once every one is decoding (its first
    tokens came), and when it ends the dict holds each request's tokens by the prompt's index."""
    results: dict[int, list[int]] = {}
    started = threading.Barrier(len(prompts) + 1)

    def ask(i: int) -> None:
        chunks = iter(client.generate(prompts[i], max_new_tokens=max_new_tokens))
        first = list(next(chunks).token_ids)
        started.wait(timeout=60)
        results[i] = first + [token for chunk in chunks for token in chunk.token_ids]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    try:
        yield results
    finally:
        for thread in threads:
            thread.join(timeout=120)


def in_threads(work: Callable[[int], object], count: int, *, timeout_s: float = 300) -> tuple[dict, list]:
    """work(0) .. work(count - 1) at once, one thread each: ({index: result}, [exceptions raised])."""
    results, errors = {}, []

    def run(index: int) -> None:
        try:
            results[index] = work(index)
        except Exception as exc:  # noqa: BLE001 - returned to the test, which reports it
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    return results, errors


def generate_on(client, prompt: str, sampling: SamplingParams = GREEDY, *, max_new_tokens: int = CLUSTER_NEW_TOKENS,
                **options):
    """The whole result of one request through a client, with the sampling of `sampling`."""
    return client.generate(prompt, max_new_tokens=max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                           top_p=sampling.top_p, seed=sampling.seed, **options).result()


# --- tiers: `make test-fast` runs what carries neither slow marker ----------------------------------------

TRAINING_FIXTURES = {"tiny_checkpoint"}  # a model trained and exported first
CLUSTER_FIXTURES = {"state_dir", "serving_cluster"}  # processes started on loopback


def pytest_collection_modifyitems(items) -> None:
    """Mark each test by what it needs: `training` when a model is trained for it, `cluster` when it starts
    processes (by fixture here; modules whose tests start them directly say so with pytestmark)."""
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        if needs & TRAINING_FIXTURES:
            item.add_marker(pytest.mark.training)
        if needs & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
