"""`speed node --join` on real processes: a node the cluster file does not name joins a serving cluster
under load and is given stages by `placement: auto`, no request fails, every text is the reference; it
drains as any node; a node without the secret, with another bundle or, in a secure cluster, without a
certificate of the cluster's authority is refused."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from runtime.client import Client
from runtime.core.bundle import DEFAULT_BUNDLE
from runtime.core.node_state import NodeState
from runtime.wire.cluster_secret import write_secret
from runtime.wire.enums import node_state_of
from tests.conftest import CLUSTER_PROMPTS as PROMPTS
from tests.conftest import assert_one_line_error, decoding, free_port, generate_on, run_speed, running_cluster

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

LONG = 160  # tokens: the node joins while the requests decode


def join_flags(cluster, name: str, address: str, *extra: str) -> list[str]:
    return ["node", "--join", cluster.endpoint, "--name", name, "--address", address, "--bundle", str(DEFAULT_BUNDLE),
            "--secret-file", str(cluster.spec.secret_file), *extra]


def start_joining(cluster, name: str, address: str, *extra: str) -> subprocess.Popen:
    with (cluster.spec.path.parent / f"{name}.log").open("w") as log:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, "-m", "runtime.cli", *join_flags(cluster, name, address, *extra)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def wait_serving(client: Client, name: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.status()
        nodes = {node.name: node for node in status.nodes}
        if name in nodes and node_state_of(nodes[name]) == NodeState.SERVING and status.placement_settled:
            return nodes
        time.sleep(0.2)
    raise AssertionError(f"{name} did not join within {timeout_s} s")


def test_a_node_joins_a_serving_cluster_under_load_and_leaves_again_without_a_text_changing(tmp_path, reference):
    with running_cluster(tmp_path, extra_top_keys="placement: auto\n") as cluster, Client(cluster.endpoint) as client, \
            contextlib.ExitStack() as stack:
        address = f"127.0.0.1:{free_port()}"
        with decoding(client, PROMPTS, LONG) as results:
            joined = stack.enter_context(subprocess_stopped(start_joining(cluster, "edge-4", address)))
            nodes = wait_serving(client, "edge-4")
        assert results == {i: reference(PROMPTS[i], max_new_tokens=LONG) for i in range(len(PROMPTS))}
        assert list(nodes["edge-4"].stages) == [] and nodes["edge-4"].address == address
        assert generate_on(client, PROMPTS[0], speculative=True).token_ids == reference(PROMPTS[0])
        log = cluster.log_of("coordinator").read_text()
        assert "node edge-4 (127.0.0.1:" in log and "joined (not in the cluster file)" in log

        drained = run_speed(*join_flags(cluster, "edge-4", address, "--drain"))
        assert drained.returncode == 0 and drained.stdout.startswith("node edge-4 drained and stopping"), drained.stderr
        assert joined.wait(timeout=30) == 0
        status = {node.name: node for node in client.status().nodes}
        assert node_state_of(status["edge-4"]) == NodeState.LEFT
        assert generate_on(client, PROMPTS[1], speculative=True).token_ids == reference(PROMPTS[1])


@contextlib.contextmanager
def subprocess_stopped(process: subprocess.Popen):
    """The process, stopped when the block ends if it still runs."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def test_a_joining_node_without_the_secret_or_with_another_bundle_is_refused(tmp_path, reference):
    with running_cluster(tmp_path) as cluster:
        wrong = tmp_path / "wrong.secret"
        write_secret(wrong)
        address = f"127.0.0.1:{free_port()}"
        flags = [flag if flag != str(cluster.spec.secret_file) else str(wrong) for flag in join_flags(cluster, "x", address)]
        assert_one_line_error(run_speed(*flags), "could not ask the coordinator at", "UNAUTHENTICATED")

        other = tmp_path / "other-bundle"
        shutil.copytree(DEFAULT_BUNDLE, other)
        manifest = json.loads((other / "manifest.json").read_text())
        (other / "manifest.json").write_text(json.dumps({**manifest, "name": "another"}))
        flags = join_flags(cluster, "y", address)
        flags[flags.index(str(DEFAULT_BUNDLE))] = str(other)
        assert_one_line_error(run_speed(*flags), f"the bundle at {other} is ", "give the node the cluster's bundle")
        assert_one_line_error(run_speed("node", "--join", cluster.endpoint, "--name", "z"),
                              "a joining node needs --address (where it serves) and --bundle")
        with Client(cluster.endpoint) as client:
            assert [node.name for node in client.status().nodes] == ["edge-1", "edge-2", "edge-3"]


def test_in_a_secure_cluster_a_node_joins_with_a_certificate_from_certs_add_node(tmp_path, reference):
    security = "security:\n  certs: certs\n  client_auth: token\n"
    with running_cluster(tmp_path, extra_top_keys=security, make_certs=True) as cluster:
        address = f"127.0.0.1:{free_port()}"
        refused = run_speed(*join_flags(cluster, "edge-4", address))  # no certificate
        assert_one_line_error(refused, "could not ask the coordinator")
        added = run_speed("certs", "add-node", "edge-4", "--cluster", str(cluster.spec.path), "--address", address)
        assert added.returncode == 0 and "speed node --join" in added.stdout, added.stderr
        assert_one_line_error(run_speed("certs", "add-node", "edge-1", "--cluster", str(cluster.spec.path), "--address",
                                        address), "edge-1 is a node of")
        node_dir = tmp_path / "edge-4-certs"
        node_dir.mkdir(mode=0o700)
        for name in ("ca.pem", "node.edge-4.pem", "node.edge-4.key"):
            shutil.copy2(cluster.spec.security.certs / name, node_dir / name)
        with subprocess_stopped(start_joining(cluster, "edge-4", address, "--certs", str(node_dir))), \
                Client(cluster.endpoint, credentials=cluster.credentials()) as client:
            wait_serving(client, "edge-4")
            assert generate_on(client, PROMPTS[2], speculative=True).token_ids == reference(PROMPTS[2])
