"""Hostile input from the same machine: step messages sent straight to real node processes and requests
sent straight to a real coordinator are refused with a status and a sentence before they cost anything,
what they made a node allocate goes back, and the answers of the cluster stay those of the reference.

The nodes here run standalone (no coordinator: incarnation 0, nobody owns them), as an attacker reaching a
node's port would find them, and three of them (one stage each of the shipped demo model, as in
deploy/local.yaml) decode a prompt when driven a step at a time, which must give the reference's tokens.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from runtime.client import Client
from runtime.core.bundle import load_bundle
from runtime.wire import options
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.tensor import pack
from tests.conftest import CLUSTER_PROMPTS, generate_on, running_cluster, write_cluster
from tests.support import assert_a_sentence, decode_on_nodes, resident_mb, running_nodes

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

DEMO = load_bundle()
D = DEMO.config.d_model
SEQ_IDS = itertools.count(5000)
MEMORY_BOUND_MB = 30  # a node's resident memory after the refused messages, above what it was before them
REFUSED_WITHIN_S = 5.0  # a hostile request to the coordinator is refused this fast (it never gets tokenized)


# --- helpers ---------------------------------------------------------------------------------------------


def raw_steps(channel: grpc.Channel):
    """Steps that sends already serialized messages, so a huge one is built once and sent many times."""
    return channel.stream_stream("/speed.v1.Node/Steps", request_serializer=None,
                                 response_deserializer=pb.StepResults.FromString)


def send_raw(channel: grpc.Channel, message: bytes) -> grpc.RpcError | None:
    """One message on a fresh stream: None if it ran, else the refusal."""
    try:
        list(raw_steps(channel)(iter([message]), timeout=60))
    except grpc.RpcError as error:
        return error
    return None


def open_sequences(stub: pb_grpc.NodeStub) -> int:
    return stub.Info(pb.InfoRequest(), timeout=5).open_sequences


# --- three standalone nodes of the demo model --------------------------------------------------------------


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Iterator[dict]:
    cluster = write_cluster(tmp_path_factory.mktemp("hostile-nodes"))  # the demo bundle, stages [0], [1], [2]
    with running_nodes(cluster, "edge-1", "edge-2", "edge-3") as started:
        yield started


@pytest.fixture(scope="module")
def channels(nodes) -> Iterator[dict[str, grpc.Channel]]:
    opened = {name: node.channel() for name, node in nodes.items()}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.fixture(scope="module")
def pipeline(channels) -> list[tuple[pb_grpc.NodeStub, tuple[int, ...]]]:
    return [(pb_grpc.NodeStub(channels[f"edge-{stage + 1}"]), (stage,)) for stage in range(3)]


def hidden_with(value: float | None, length: int = 8) -> pb.Tensor:
    hidden = np.random.default_rng(length).standard_normal((length, D)).astype(np.float32)
    if value is not None:
        hidden[length // 2, D // 3] = value
    return pack(hidden)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "all NaN"])
def test_a_non_finite_hidden_state_is_refused_and_the_node_still_decodes_right(nodes, channels, pipeline, reference,
                                                                                bad):
    """Once, a node took an all-NaN hidden state: its cache rows held NaN, and every later sequence in them
    decoded to nothing ("eos") until a restart. Now nothing of such a message touches a cache."""
    seq_id, bystander = next(SEQ_IDS), next(SEQ_IDS)
    hidden = pack(np.full((8, D), np.nan, np.float32)) if bad == "all NaN" else hidden_with(bad)
    # the bad sequence first, so that before the fix it took the slot (and cache rows) the next sequence gets
    message = pb.StepBatch(opens=[pb.OpenSequence(seq_id=seq_id, capacity=8), pb.OpenSequence(seq_id=bystander, capacity=8)],
                           items=[pb.StepItem(seq_id=bystander, start=0, length=8, stage=1, hidden=hidden_with(None)),
                                  pb.StepItem(seq_id=seq_id, start=0, length=8, stage=1, hidden=hidden)])
    error = send_raw(channels["edge-2"], message.SerializeToString())
    opened = open_sequences(pipeline[1][0])
    assert send_raw(channels["edge-2"], pb.StepBatch(closes=[seq_id, bystander]).SerializeToString()) is None
    generated = decode_on_nodes(pipeline, CLUSTER_PROMPTS[0])

    assert error is not None, "a hidden state with NaN or infinity was accepted"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_a_sentence(error)
    assert "NaN or infinite" in error.details() and "sequence" in error.details()
    assert opened == 0  # refused whole: not even the good item's sequence was opened
    assert generated == reference(CLUSTER_PROMPTS[0])
    assert all(node.process.poll() is None for node in nodes.values())


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, to write a message of a million entries without a million objects."""
    from google.protobuf.internal.encoder import _VarintBytes

    return _VarintBytes(number << 3 | 2) + _VarintBytes(len(payload)) + payload


def malformed_step_messages() -> dict[str, bytes]:
    """Messages that once made a node allocate far more than their size, or kept what they made it allocate."""
    def opening(seq_id: int) -> bytes:
        return _field(2, pb.OpenSequence(seq_id=seq_id, capacity=8).SerializeToString())

    big = 48 * 1024 * 1024  # below gRPC's 64 MB message limit
    item = dict(seq_id=1, start=0, length=8, stage=1)
    return {
        "hidden bytes beyond its shape": pb.StepBatch(opens=[pb.OpenSequence(seq_id=1, capacity=8)], items=[pb.StepItem(
            **item, hidden=pb.Tensor(dtype="float32", shape=[8, D], data=bytes(big)))]).SerializeToString(),
        "a huge dtype name": pb.StepBatch(opens=[pb.OpenSequence(seq_id=1, capacity=8)], items=[pb.StepItem(
            **item, hidden=pb.Tensor(dtype="f" * big))]).SerializeToString(),
        "two million dimensions": pb.StepBatch(opens=[pb.OpenSequence(seq_id=1, capacity=8)], items=[pb.StepItem(
            **item, hidden=pb.Tensor(dtype="float32", shape=np.arange(2_000_000) + 300))]).SerializeToString(),
        "200000 opens": b"".join(opening(10**6 + k) for k in range(200_000)),
        "two million closes": pb.StepBatch(closes=np.arange(2_000_000) + 10**12,
                                           items=[pb.StepItem(**item)]).SerializeToString(),
        "200000 truncations": opening(1) + b"".join(
            _field(3, pb.Truncation(seq_id=1, stage=1, length=k).SerializeToString()) for k in range(200_000)),
        "a NaN hidden state": pb.StepBatch(opens=[pb.OpenSequence(seq_id=1, capacity=8)], items=[pb.StepItem(
            **item, hidden=pack(np.full((8, D), np.nan, np.float32)))]).SerializeToString(),
    }


def test_malformed_step_messages_leave_a_node_as_much_memory_as_before(nodes, channels, pipeline, reference):
    """Once, 26 malformed step messages took a node from 113 MB to 429 MB resident, for good."""
    messages = malformed_step_messages()
    node, channel = nodes["edge-2"], channels["edge-2"]
    decode_on_nodes(pipeline, CLUSTER_PROMPTS[1], max_new_tokens=4)  # what serving allocates is there already
    time.sleep(1.0)
    before = resident_mb(node.process.pid)
    refusals = {}
    for name, message in itertools.islice(itertools.cycle(messages.items()), 30):
        refusals[name] = send_raw(channel, message)
    time.sleep(2.0)  # the node gives freed memory back half a second after a burst of refusals
    after = resident_mb(node.process.pid)

    for name, error in refusals.items():
        assert error is not None, f"{name}: accepted"
        assert_a_sentence(error)
    assert node.process.poll() is None
    assert after - before <= MEMORY_BOUND_MB, f"{before:.0f} MB before 30 malformed messages, {after:.0f} MB after"
    assert open_sequences(pipeline[1][0]) == 0
    assert decode_on_nodes(pipeline, CLUSTER_PROMPTS[2]) == reference(CLUSTER_PROMPTS[2])


def test_a_legitimate_step_message_fits_the_node_message_size():
    """The size a node's gRPC server could be limited to holds the largest step a coordinator sends: every
    sequence slot at every stage with a prompt chunk of hidden states, plus every close and truncation."""
    from nodes.host import CLOSES_PER_SLOT, TRUNCATIONS_PER_ROW

    slots, stages, chunk = 8, 3, 64
    batch = pb.StepBatch(tick=2**63, incarnation=2**63, closes=[2**64 - 1] * (CLOSES_PER_SLOT * slots),
                         opens=[pb.OpenSequence(seq_id=2**64 - 1, capacity=2**31 - 1, plain_guesses=True,
                                                sampling=pb.Sampling(temperature=1, top_k=2**31 - 1, top_p=1, seed=-1))
                                for _ in range(slots)],
                         truncations=[pb.Truncation(seq_id=2**64 - 1, stage=2**31 - 1, length=2**31 - 1)
                                      for _ in range(TRUNCATIONS_PER_ROW * slots * stages)])
    for _ in range(slots * stages):
        batch.items.add(seq_id=2**64 - 1, start=2**31 - 1, length=chunk, stage=2**31 - 1, skip_prediction=True,
                        tokens=[2**31 - 1] * chunk, hidden=pack(np.zeros((chunk, D), np.float32)))
    limit = options.step_message_bytes(d_model=D, max_items=slots * stages, max_positions=chunk)
    assert batch.ByteSize() <= limit < options.MAX_MESSAGE_BYTES
    assert ("grpc.max_receive_message_length", limit) in options.node_server(limit)


# --- the coordinator ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("hostile-cluster")) as running:
        yield running


PROMPT = CLUSTER_PROMPTS[0]
HUGE_REQUESTS = {  # built when a test runs, not when tests are collected
    "a 50 MB prompt": lambda: pb.GenerateRequest(prompt="To be, or not to be: " * (50 * 1024 * 1024 // 21),
                                                 max_new_tokens=4),
    "100000 stop strings": lambda: pb.GenerateRequest(prompt=PROMPT, max_new_tokens=4,
                                                      stop=[f"stop {i}" for i in range(100_000)]),
    "a 1 MB stop string": lambda: pb.GenerateRequest(prompt=PROMPT, max_new_tokens=4, stop=["\n", "x" * (1 << 20)]),
    "five million continuation tokens": lambda: pb.GenerateRequest(
        prompt=PROMPT, max_new_tokens=2**31 - 1, continuation=pb.Continuation(token_ids=[1] * 5_000_000)),
    "an infinite temperature": lambda: pb.GenerateRequest(prompt=PROMPT, max_new_tokens=4,
                                                          sampling=pb.Sampling(temperature=float("inf"))),
    "a temperature of 1e30": lambda: pb.GenerateRequest(prompt=PROMPT, max_new_tokens=4,
                                                        sampling=pb.Sampling(temperature=1e30)),
}


@pytest.mark.parametrize("name", list(HUGE_REQUESTS))
def test_a_huge_or_absurd_request_is_refused_at_once_with_a_sentence(cluster, reference, name):
    request = HUGE_REQUESTS[name]()
    with grpc.insecure_channel(cluster.endpoint, options=options.CHANNEL) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            list(pb_grpc.CoordinatorStub(channel).Generate(request, timeout=30))
        took = time.monotonic() - started
    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details()[:300])
    assert_a_sentence(error)
    assert took < REFUSED_WITHIN_S, f"{name}: refused after {took:.1f} s"
    with Client(cluster.endpoint) as client:
        assert generate_on(client, CLUSTER_PROMPTS[3]).token_ids == reference(CLUSTER_PROMPTS[3])
    assert all(process.poll() is None for process in cluster.processes.values())
