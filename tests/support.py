"""Helpers that several test modules share and that are no fixtures: standalone node processes driven over
gRPC (registered with a stand-in for the coordinator's registry, so a test can assign their stages), what
a refusal of bad input must look like, and checks of a cluster's ports and of two backends."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings

from runtime.core.bundle import Bundle, load_bundle
from runtime.core.cluster_file import load_cluster, on_host_of, parse_address
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import load_secret
from runtime.wire.frames import HANDSHAKE_BYTES, frame, read_frame
from runtime.wire.security import member_channel
from tests.conftest import CLUSTER_NEW_TOKENS

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10
TICKS = itertools.count(1)
DECODE_SEQ_IDS = itertools.count(900_000)  # sequences decode_on_nodes opens, apart from those tests open


# --- a cluster file's ports ------------------------------------------------------------------------------


def ports_free(path) -> bool:
    """Every address of the cluster file can be bound again: nothing of the cluster still listens."""
    spec = load_cluster(path)
    for address in [spec.coordinator.address, *(n.address for n in spec.nodes)]:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(parse_address(address))
            except OSError:
                return False
    return True


# --- two backends of one bundle ---------------------------------------------------------------------------

BACKEND_PROMPTS = [
    "ROMEO:", "To be, or not to be", "KING HENRY. Once more unto the breach", "What light through yonder",
    "O", "Good morrow, my lord.", "Enter a Messenger", "My lord, I have", "Thou art", "\n\n", "HAMLET.",
    "Now is the winter of our discontent", "Friends, Romans, countrymen", "Exeunt", "LADY MACBETH. Out, damned",
    "The quality of mercy", "A horse! a horse!", "If music be the food of love", "All the world's a stage",
    "Shall I compare thee", "FIRST WITCH. When shall we three", "Is this a dagger", "Cry havoc",
    "We few, we happy few", "Lord, what fools",
]


def assert_backends_agree(bundle: Bundle, onnx_model, torch_model, max_new_tokens: int) -> None:
    """Greedy decoding gives the same tokens from ONNX Runtime and torch on every prompt of BACKEND_PROMPTS."""
    from runtime.local.plain import generate_plain

    tokenizer = bundle.tokenizer()
    for prompt in BACKEND_PROMPTS:
        ids = tokenizer.encode(prompt).ids
        a = generate_plain(onnx_model, ids, max_new_tokens=max_new_tokens, eos_id=bundle.eos_token_id)
        b = generate_plain(torch_model, ids, max_new_tokens=max_new_tokens, eos_id=bundle.eos_token_id)
        assert a.token_ids == b.token_ids, prompt


# --- standalone node processes --------------------------------------------------------------------------


@dataclass
class NodeProcess:
    name: str
    address: str
    process: subprocess.Popen
    log: Path  # the node's stderr
    cluster: Path
    assign_key: str = ""  # what it gave when it registered: an Assign needs it

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        return member_channel(load_cluster(self.cluster), self.address)

    def link_address(self) -> str:
        """Where it takes direct links from the other nodes, as its Info says."""
        with self.channel() as channel:
            port = pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10).link_port
        return on_host_of(self.address, port)


class RegistryStandIn(pb_grpc.RegistryServicer):
    """The coordinator's registry and nothing else: nodes register (incarnation 0, so they stay standalone)
    and beat; the keys they give are kept for the tests that assign their stages."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}

    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterReply:
        self.keys[request.info.name] = request.assign_key
        return pb.RegisterReply(cluster="stand-in", heartbeat_interval_s=1.0, incarnation=0)

    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        return pb.HeartbeatReply(known=request.name in self.keys)


def start_node(cluster: Path, name: str) -> NodeProcess:
    log = cluster.parent / f"{name}.stderr"
    with log.open("wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "node", "--cluster", str(cluster), "--name", name],
                                   stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return NodeProcess(name, load_cluster(cluster).node(name).address, process, log, cluster)


def wait_serving(node: NodeProcess, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(node.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                pytest.fail(f"node {node.name} exited with status {node.process.returncode}:\n{node.stderr()}")
            with contextlib.suppress(grpc.RpcError):
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    pytest.fail(f"node {node.name} not SERVING after {timeout_s} s:\n{node.stderr()}")


def stop_node(node: NodeProcess) -> int:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S; the exit status."""
    if node.process.poll() is None:
        node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()
    return node.process.returncode


@contextlib.contextmanager
def node_stubs(nodes: dict[str, NodeProcess]) -> Iterator[dict[str, pb_grpc.NodeStub]]:
    """A Node stub for each running node; their channels close after."""
    channels = {name: node.channel() for name, node in nodes.items()}
    try:
        yield {name: pb_grpc.NodeStub(channel) for name, channel in channels.items()}
    finally:
        for channel in channels.values():
            channel.close()


@contextlib.contextmanager
def running_nodes(cluster: Path, *names: str) -> Iterator[dict[str, NodeProcess]]:
    registry = RegistryStandIn()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RegistryServicer_to_server(registry, server)
    server.add_insecure_port(load_cluster(cluster).coordinator.address)
    server.start()
    nodes = {}
    try:
        for name in names:  # started together, so they load the bundle in parallel
            nodes[name] = start_node(cluster, name)
        for node in nodes.values():
            wait_serving(node)
            deadline = time.monotonic() + START_TIMEOUT_S
            while node.name not in registry.keys and time.monotonic() < deadline:
                time.sleep(0.05)
            node.assign_key = registry.keys[node.name]
        yield nodes
    finally:
        for node in nodes.values():
            stop_node(node)
        server.stop(grace=None)


class Steps:
    """One Steps stream, driven a batch at a time as the coordinator drives it."""

    def __init__(self, stub: pb_grpc.NodeStub):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies = stub.Steps(iter(self._requests.get, None), timeout=30)

    def step(self, batch: pb.StepBatch) -> pb.StepResults:
        batch.tick = next(TICKS)
        self._requests.put(batch)
        reply = next(self._replies)
        assert reply.tick == batch.tick
        return reply

    def refused(self, batch: pb.StepBatch) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as refusal:
            self.step(batch)
        return refusal.value

    def end(self) -> None:
        self._requests.put(None)
        self._replies.cancel()


@contextlib.contextmanager
def steps(stub: pb_grpc.NodeStub) -> Iterator[Steps]:
    stream = Steps(stub)
    try:
        yield stream
    finally:
        stream.end()


# --- hostile input: how a refusal must look, and decoding on standalone nodes afterwards ----------------

# how many examples each fuzz test runs: a few seconds' worth; SPEED_FUZZ_EXAMPLES=10000 for a long run by hand
FUZZ = settings(max_examples=int(os.environ.get("SPEED_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# what a refusal may be: never UNKNOWN or INTERNAL (a bug), nor UNAVAILABLE or CANCELLED (a process gone)
REFUSAL_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}


def resident_mb(pid: int) -> float:
    """VmRSS of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def assert_a_sentence(error: grpc.RpcError) -> None:
    """A refusal of bad input: a status meant for it and one line that says why."""
    details = error.details() or ""
    assert error.code() in REFUSAL_CODES, (error.code(), details[:300])
    assert details.strip() and "\n" not in details and len(details) < 1000, details[:300]


@functools.cache
def demo_bundle() -> Bundle:
    """The shipped demo bundle, loaded (and its hashes checked) once."""
    return load_bundle()


def decode_on_nodes(pipeline: list[tuple[pb_grpc.NodeStub, tuple[int, ...]]], prompt: str,
                    max_new_tokens: int = CLUSTER_NEW_TOKENS) -> list[int]:
    """Greedy tokens of `prompt` with the demo model, driving standalone nodes a step at a time as a sequential
    coordinator does: pipeline lists (node, the stages it hosts) in stage order."""
    demo = demo_bundle()
    prompt_ids = demo.tokenizer().encode(prompt).ids
    seq_id = next(DECODE_SEQ_IDS)
    try:
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(steps(stub)) for stub, _ in pipeline]
            opening = [pb.OpenSequence(seq_id=seq_id, capacity=len(prompt_ids) + max_new_tokens)]
            tokens, start, generated = prompt_ids, 0, []
            while len(generated) < max_new_tokens:
                hidden, prediction = None, -1
                for stream, (_, stages) in zip(streams, pipeline):
                    for index, stage in enumerate(stages):
                        item = pb.StepItem(seq_id=seq_id, start=start, length=len(tokens), stage=stage,
                                           skip_prediction=True)
                        if stage == 0:
                            item.tokens.extend(tokens)
                        elif index == 0:
                            item.hidden.CopyFrom(hidden)
                        [result] = stream.step(pb.StepBatch(opens=opening if index == 0 else [], items=[item])).results
                        hidden, prediction = result.hidden, result.prediction
                opening = []
                if prediction == demo.eos_token_id:
                    break
                generated.append(prediction)
                start, tokens = start + len(tokens), [prediction]
    finally:
        for stub, _ in pipeline:
            with steps(stub) as stream:
                stream.step(pb.StepBatch(closes=[seq_id]))
    return generated


def ring_link(node: NodeProcess, incarnation: int, epoch: int, **binding) -> tuple[socket.socket, BinaryIO, str]:
    """A coordinator's link to `node` for placement `epoch` of `incarnation` (binding: fields to change): the
    connection, its reading end and the node's answer's refusal."""
    fields = dict(incarnation=incarnation, epoch=epoch, assign_key=node.assign_key) | binding
    hello = pb.LinkHello(secret=load_secret(load_cluster(node.cluster)), ring=pb.RingBinding(**fields))
    link = socket.create_connection(parse_address(node.link_address()), timeout=60)
    link.sendall(frame(hello.SerializeToString()))
    answers = link.makefile("rb")
    return link, answers, pb.LinkAnswer.FromString(read_frame(answers, HANDSHAKE_BYTES)).refusal
