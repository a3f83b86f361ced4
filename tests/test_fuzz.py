"""Fuzzing real processes: random and mutated step messages straight to standalone nodes, random and
mutated requests to a coordinator. Whatever comes in, no process dies, every refusal is a status meant for
bad input with a sentence, nothing non-finite comes out, memory stays where it was, and a normal
generation afterwards gives the reference's tokens.

The nodes run standalone (no coordinator: incarnation 0), edge-1 with stage 0 and edge-2 with stages 1
and 2 of the shipped demo model, so both a hidden state from elsewhere and one held from the node's own
previous stage are exercised; the coordinator is a separate cluster of its own.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodes.peer_links import Dialler
from runtime.client import Client
from runtime.core.cluster_file import load_cluster
from runtime.core.stopping import StopReason
from runtime.wire import options
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import load_secret
from runtime.wire.frames import HANDSHAKE_BYTES, frame, read_frame
from runtime.wire.tensor import pack
from tests.conftest import CLUSTER_PROMPTS, generate_on, running_cluster, write_cluster
from tests.support import (
    FUZZ,
    REFUSAL_CODES,
    assert_a_sentence,
    decode_on_nodes,
    demo_bundle,
    node_stubs,
    resident_mb,
    ring_link,
    running_nodes,
    steps,
)

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

DEMO = demo_bundle()
VOCAB, CONTEXT, D = DEMO.config.vocab_size, DEMO.config.context_length, DEMO.config.d_model
MEMORY_BOUND_MB = 30  # each node's resident memory after the fuzzing, above what it was before
MAX_FUZZED_BYTES = 64 << 20  # far beyond what a node takes (it must refuse it), within what this test may build
POOL = [1, 2, 3, 2**64 - 1]  # sequence ids the messages of one example share, so they meet each other's
NODE_STAGES = {"edge-1": (0,), "edge-2": (1, 2)}

u64 = st.one_of(st.sampled_from([*POOL, 0]), st.integers(0, 2**64 - 1))
i32 = st.one_of(st.sampled_from([0, 1, 2, 5, 8, 64, CONTEXT, CONTEXT + 1, -1, 2**31 - 1, -(2**31)]),
                st.integers(-(2**31), 2**31 - 1))
odd_floats = st.sampled_from([0.0, 0.5, 1.0, 100.0, 100.5, 1e-30, 1e30, math.inf, -math.inf, math.nan, -1.0])
samplings = st.builds(pb.Sampling, temperature=odd_floats, top_k=i32, top_p=odd_floats,
                      seed=st.integers(-(2**63), 2**63 - 1))
fair_samplings = st.builds(pb.Sampling, temperature=st.floats(0, 2, width=32), top_k=st.integers(0, 50),
                           top_p=st.floats(0.25, 1, width=32), seed=st.integers(-(2**63), 2**63 - 1))


# --- step messages: valid ones, then mutated ----------------------------------------------------------------


def valid_steps(node: str, seq_id: int, length: int, capacity: int, rng: np.random.Generator) -> list[pb.StepBatch]:
    """A prompt step that opens the sequence, then the next position (and on edge-2 the prompt's stage 2)."""
    def hidden(start: int, n: int) -> pb.StepItem:
        return pb.StepItem(seq_id=seq_id, start=start, length=n, stage=1,
                           hidden=pack(rng.standard_normal((n, D)).astype(np.float32)))

    opening = pb.OpenSequence(seq_id=seq_id, capacity=capacity, sampling=pb.Sampling(temperature=0.8, seed=7))
    if node == "edge-1":
        return [pb.StepBatch(opens=[opening], items=[pb.StepItem(seq_id=seq_id, start=0, length=length, stage=0,
                                                                 tokens=rng.integers(0, VOCAB, length).tolist())]),
                pb.StepBatch(items=[pb.StepItem(seq_id=seq_id, start=length, length=1, stage=0, tokens=[5])])]
    return [pb.StepBatch(opens=[opening], items=[hidden(0, length)]),
            pb.StepBatch(items=[hidden(length, 1), pb.StepItem(seq_id=seq_id, start=0, length=length, stage=2)])]


def _any_item(draw, batch: pb.StepBatch) -> pb.StepItem:
    if not batch.items:
        batch.items.add(seq_id=draw(u64), start=0, length=1, stage=draw(st.sampled_from([0, 1, 2])))
    return batch.items[draw(st.integers(0, len(batch.items) - 1))]


def _ids(draw, batch):
    item = _any_item(draw, batch)
    item.seq_id = draw(u64)
    if batch.opens and draw(st.booleans()):
        batch.opens[0].seq_id = draw(u64)


def _stage(draw, batch):
    _any_item(draw, batch).stage = draw(st.one_of(st.sampled_from([-1, 0, 1, 2, 3]), i32))


def _start(draw, batch):
    _any_item(draw, batch).start = draw(i32)


def _length(draw, batch):
    _any_item(draw, batch).length = draw(i32)


def _tokens(draw, batch):
    item = _any_item(draw, batch)
    del item.tokens[:]
    item.tokens.extend(draw(st.one_of(
        st.lists(st.one_of(st.integers(0, VOCAB - 1), i32), max_size=10),
        st.sampled_from([[VOCAB], [-1], [2**31 - 1] * 3]),
        st.integers(1000, 200_000).map(lambda n: [7] * n))))  # far more than the item's length


def _dtype(draw, batch):
    _any_item(draw, batch).hidden.dtype = draw(st.sampled_from(["float64", "", "float16", "int32", ">f4", "x" * 5000,
                                                               "float32"]))


def _shape(draw, batch):
    hidden = _any_item(draw, batch).hidden
    del hidden.shape[:]
    hidden.shape.extend(draw(st.one_of(
        st.lists(st.one_of(st.sampled_from([0, 1, 8, D, -1, 2**62, -(2**63)]), st.integers(-5, 300)), max_size=4),
        st.integers(10, 100_000).map(lambda n: [1] * n))))


def _data(draw, batch):
    hidden = _any_item(draw, batch).hidden
    how = draw(st.sampled_from(["cut", "grow", "empty", "big", "random"]))
    if how == "cut":
        hidden.data = hidden.data[: draw(st.integers(0, max(len(hidden.data) - 1, 0)))]
    elif how == "grow":
        hidden.data = hidden.data + bytes(draw(st.integers(1, 64)))
    elif how == "empty":
        hidden.data = b""
    elif how == "big":
        hidden.data = bytes(draw(st.sampled_from([1 << 20, 3 << 20])))
    else:  # the right length, any bits: NaN and infinity among them
        hidden.data = draw(st.binary(min_size=len(hidden.data), max_size=len(hidden.data)))


def _non_finite(draw, batch):
    item = _any_item(draw, batch)
    if item.hidden.dtype == "float32" and len(item.hidden.data) >= 4 and len(item.hidden.data) % 4 == 0:
        values = np.frombuffer(item.hidden.data, "<f4").copy()
        values[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        item.hidden.data = values.tobytes()


def _truncations(draw, batch):
    for _ in range(draw(st.integers(1, 3))):
        batch.truncations.add(seq_id=draw(u64), stage=draw(st.sampled_from([0, 1, 2, 3, -1])), length=draw(i32))


def _opens(draw, batch):
    for _ in range(draw(st.integers(1, 3))):
        batch.opens.add(seq_id=draw(u64), capacity=draw(i32), sampling=draw(samplings), plain_guesses=draw(st.booleans()))


def _odd_sampling(draw, batch):
    if batch.opens:
        batch.opens[0].sampling.CopyFrom(draw(samplings))
        batch.opens[0].capacity = draw(i32)


def _closes(draw, batch):
    batch.closes.extend(draw(st.one_of(st.lists(u64, max_size=4), st.integers(100, 5000).map(lambda n: [9] * n))))


def _many(draw, batch):
    """More opens, truncations or items than a coordinator ever sends (the message at most MAX_FUZZED_BYTES:
    repeated after other mutations grew it, it could take more memory than the machine has)."""
    times = min(draw(st.sampled_from([2, 9, 100, 2000])), max(1, MAX_FUZZED_BYTES // max(batch.ByteSize(), 1)))
    field = draw(st.sampled_from(["opens", "truncations", "items"]))
    entries = list(getattr(batch, field)) or [pb.Truncation(seq_id=1, stage=1, length=0)]
    if field == "truncations" and not batch.truncations:
        batch.truncations.extend(entries * times)
    elif entries and not isinstance(entries[0], pb.Truncation):
        getattr(batch, field).extend(entries * (times - 1))


def _drop_opens(draw, batch):
    del batch.opens[:]


def _incarnation(draw, batch):
    batch.incarnation = draw(st.integers(1, 2**64 - 1))


def _flags(draw, batch):
    item = _any_item(draw, batch)
    item.skip_prediction = not item.skip_prediction
    if batch.opens:
        batch.opens[0].plain_guesses = not batch.opens[0].plain_guesses


MUTATIONS = [_ids, _stage, _start, _length, _tokens, _dtype, _shape, _data, _non_finite, _truncations, _opens,
             _odd_sampling, _closes, _many, _drop_opens, _incarnation, _flags]


@st.composite
def step_examples(draw) -> tuple[str, list[pb.StepBatch]]:
    """A node and up to three messages for it: valid ones of one sequence, each maybe mutated."""
    node = draw(st.sampled_from(list(NODE_STAGES)))
    length = draw(st.integers(1, 8))
    batches = valid_steps(node, draw(st.sampled_from(POOL)), length, draw(st.integers(length + 1, 32)),
                          np.random.default_rng(draw(st.integers(0, 2**32))))
    batches = batches[: draw(st.integers(1, 2))]
    for batch in batches:
        for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
            mutation(draw, batch)
    if draw(st.booleans()):
        extra = pb.StepBatch()
        for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
            mutation(draw, extra)
        batches.append(extra)
    return node, batches


def check_reply(batch: pb.StepBatch, reply: pb.StepResults) -> None:
    """What an accepted message gives: a result per item, in order, with a token id and finite hidden states."""
    assert [(r.seq_id, r.start) for r in reply.results] == [(i.seq_id, i.start) for i in batch.items]
    for result in reply.results:
        assert -1 <= result.prediction < VOCAB
        if result.HasField("hidden"):
            assert result.hidden.dtype == "float32"
            assert np.isfinite(np.frombuffer(result.hidden.data, "<f4")).all()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Iterator[dict]:
    cluster = write_cluster(tmp_path_factory.mktemp("fuzz-nodes"), stages=[list(s) for s in NODE_STAGES.values()])
    with running_nodes(cluster, *NODE_STAGES) as started:
        yield started


@pytest.fixture(scope="module")
def stubs(nodes) -> Iterator[dict[str, pb_grpc.NodeStub]]:
    with node_stubs(nodes) as made:
        yield made


def test_fuzzed_step_messages_are_refused_with_a_sentence_and_harm_no_node(nodes, stubs, reference):
    pipeline = [(stubs[name], stages) for name, stages in NODE_STAGES.items()]
    decode_on_nodes(pipeline, CLUSTER_PROMPTS[1], max_new_tokens=4)  # what serving allocates is there already
    time.sleep(1.0)
    before = {name: resident_mb(node.process.pid) for name, node in nodes.items()}
    outcomes = {"accepted": 0, "refused": 0}

    @FUZZ
    @given(step_examples())
    def fuzz(example: tuple[str, list[pb.StepBatch]]) -> None:
        name, batches = example
        seq_ids = {*POOL, *(o.seq_id for b in batches for o in b.opens)}
        try:
            with steps(stubs[name]) as stream:
                for batch in batches:
                    try:
                        check_reply(batch, stream.step(batch))
                        outcomes["accepted"] += 1
                    except grpc.RpcError as error:
                        outcomes["refused"] += 1
                        assert_a_sentence(error)
                        break  # a refusal ends the stream
        finally:  # whatever the example opened goes, so the next one finds the node as this one did
            with steps(stubs[name]) as stream:
                stream.step(pb.StepBatch(closes=sorted(seq_ids)[:500]))
        assert all(node.process.poll() is None for node in nodes.values())

    fuzz()
    time.sleep(2.0)  # a node gives freed memory back half a second after a burst of refusals
    after = {name: resident_mb(node.process.pid) for name, node in nodes.items()}
    assert outcomes["accepted"] and outcomes["refused"], outcomes
    for name in nodes:
        assert stubs[name].Info(pb.InfoRequest(), timeout=5).open_sequences == 0
        assert after[name] - before[name] <= MEMORY_BOUND_MB, (name, before[name], after[name])
    assert decode_on_nodes(pipeline, CLUSTER_PROMPTS[0]) == reference(CLUSTER_PROMPTS[0])


# --- forwarded messages on the direct links between nodes ----------------------------------------------------


tensors = st.one_of(
    st.builds(lambda rows, width, fill: pack(np.full((rows, width), fill, np.float32)), st.integers(0, 3),
              st.sampled_from([D, D - 1, 1, 0]), odd_floats),
    st.builds(pb.Tensor, dtype=st.sampled_from(["float32", "float64", "int8", "", "<f4"]),
              shape=st.lists(i32, max_size=3), data=st.binary(max_size=64)))
hops = st.builds(pb.RingHop, seq_id=u64, gen=u64, stage=i32, start=i32, tokens=st.lists(i32, max_size=4),
                 committed=i32, hidden=tensors)
forwarded_messages = st.builds(
    pb.Forwarded, incarnation=u64, epoch=u64, hops=st.lists(hops, max_size=3),
    corrections=st.lists(st.builds(pb.RingCorrection, seq_id=u64, gen=u64, position=i32, token=i32, found_at=i32),
                         max_size=2),
    commits=st.lists(st.builds(pb.RingCommit, seq_id=u64, position=i32, token=i32), max_size=2))
frames_on_a_link = st.lists(st.one_of(forwarded_messages.map(pb.Forwarded.SerializeToString), st.binary(max_size=300)),
                            min_size=1, max_size=4)


def test_fuzzed_forwarded_messages_end_their_link_with_a_sentence_and_harm_no_node(nodes, stubs, reference):
    dial = Dialler("edge-1", load_secret(load_cluster(nodes["edge-2"].cluster)))
    address = nodes["edge-2"].link_address()
    outcomes = {"taken": 0, "refused": 0}

    @FUZZ
    @given(frames_on_a_link)
    def fuzz(payloads: list[bytes]) -> None:
        with dial("edge-2", address) as link, link.makefile("rb") as answers:
            link.settimeout(2)
            for payload in payloads:
                link.sendall(frame(payload))
            link.shutdown(socket.SHUT_WR)  # the link ends here; a refusing node reads it to its end, then closes
            answer = read_frame(answers, HANDSHAKE_BYTES)
        if answer is None:
            outcomes["taken"] += 1
        else:
            outcomes["refused"] += 1
            refusal = pb.LinkAnswer.FromString(answer).refusal
            assert refusal.strip() and "\n" not in refusal and len(refusal) < 1000, refusal
        assert nodes["edge-2"].process.poll() is None

    fuzz()
    assert outcomes["taken"] and outcomes["refused"], outcomes
    pipeline = [(stubs[name], stages) for name, stages in NODE_STAGES.items()]
    assert decode_on_nodes(pipeline, CLUSTER_PROMPTS[0]) == reference(CLUSTER_PROMPTS[0])


# --- ring control on a coordinator's link to a node ----------------------------------------------------------


ring_opens = st.builds(
    pb.RingOpen, sequence=st.builds(pb.OpenSequence, seq_id=u64, sampling=st.one_of(fair_samplings, samplings),
                                    capacity=i32, plain_guesses=st.booleans()),
    prefill=st.lists(st.one_of(st.integers(0, VOCAB - 1), i32), max_size=6), last_position=i32, window=i32,
    guess_thresholds=st.lists(odd_floats, max_size=3), prompt_tokens=i32)
ring_controls = st.builds(pb.RingControl, closes=st.lists(u64, max_size=3), opens=st.lists(ring_opens, max_size=3))
# (the control, whether it carries the link's own placement) or raw bytes
frames_on_a_ring_link = st.lists(st.one_of(st.tuples(ring_controls, st.booleans()), st.binary(max_size=200)),
                                 min_size=1, max_size=4)


def test_fuzzed_ring_control_ends_no_node_and_every_failure_is_a_sentence(nodes, stubs, reference):
    """What a coordinator's link may bring a node (after its secret and the node's assign key): whatever opens
    and closes, the node answers with failures and refusals in sentences, and goes on serving."""
    placement = [pb.StagePlace(stage=stage, node=name, address=nodes[name].address, link_address=nodes[name].link_address())
                 for name, stages in NODE_STAGES.items() for stage in stages]
    epochs = iter(range(1, 10**6))
    said = {"failures": 0, "refusals": 0}

    @FUZZ
    @given(frames_on_a_ring_link)
    def fuzz(sent: list) -> None:
        epoch = next(epochs)
        stubs["edge-2"].Assign(pb.AssignRequest(stages=NODE_STAGES["edge-2"], placement=placement, epoch=epoch,
                                                assign_key=nodes["edge-2"].assign_key), timeout=10)
        link, answers, refusal = ring_link(nodes["edge-2"], 0, epoch)
        with link, answers:
            assert refusal == ""
            link.settimeout(10)
            for message in sent:
                if isinstance(message, tuple):
                    control, live = message
                    control.epoch = epoch if live else control.epoch
                    message = control.SerializeToString()
                link.sendall(frame(message))
            link.shutdown(socket.SHUT_WR)  # the placement ends here: the node frees what it opened
            while (payload := read_frame(answers, 1 << 24)) is not None:
                events = pb.RingEvents.FromString(payload)
                for sentence in [failure.message for failure in events.failed] + [events.refusal] * bool(events.refusal):
                    assert sentence.strip() and "\n" not in sentence and len(sentence) < 1000, sentence
                said["failures"] += len(events.failed)
                said["refusals"] += bool(events.refusal)
        assert nodes["edge-2"].process.poll() is None

    fuzz()
    assert said["failures"] and said["refusals"], said
    stubs["edge-2"].Assign(pb.AssignRequest(stages=NODE_STAGES["edge-2"], assign_key=nodes["edge-2"].assign_key),
                           timeout=10)  # back to the lockstep path
    pipeline = [(stubs[name], stages) for name, stages in NODE_STAGES.items()]
    assert decode_on_nodes(pipeline, CLUSTER_PROMPTS[1]) == reference(CLUSTER_PROMPTS[1])


# --- requests to a coordinator ---------------------------------------------------------------------------


REQUEST_TIMEOUT_S = 3.0  # a request that decodes to the end of the context may run out of it: allowed
ENDS = {pb.StopReason.Value(f"STOP_REASON_{reason.name}") for reason in StopReason}


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        prompt=draw(st.one_of(st.sampled_from([*CLUSTER_PROMPTS, "", " ", "\x00", "é" * 70_000, "a" * 65_536]),
                              st.text(max_size=40))),
        max_new_tokens=draw(st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8),
                                      st.sampled_from([0, -1, -(2**31)] * 6 + [2**31 - 1]))),
        sampling=draw(st.one_of(st.just(pb.Sampling()), fair_samplings, samplings)),
        stop=draw(st.one_of(st.lists(st.text(max_size=5), max_size=3),
                            st.sampled_from([["x" * 257], ["a"] * 17, [""], ["\n"], ["e"]]))),
        ignore_eos=draw(st.booleans()), chat=draw(st.booleans()), plain_guesses=draw(st.booleans()))
    speculative = draw(st.sampled_from([None, True, False]))
    if speculative is not None:
        request.speculative = speculative
    if draw(st.booleans()):
        request.continuation.token_ids.extend(draw(st.lists(
            st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([-1, VOCAB, 2**31 - 1])), max_size=6)))
        request.continuation.text_chars = draw(i32)
    return request


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("fuzz-cluster")) as running:
        yield running


def test_fuzzed_requests_are_refused_with_a_sentence_and_harm_no_process(cluster, reference):
    node_pids = {name: process.pid for name, process in cluster.processes.items() if name != "coordinator"}
    with Client(cluster.endpoint) as client:
        assert generate_on(client, CLUSTER_PROMPTS[1]).token_ids == reference(CLUSTER_PROMPTS[1])
    time.sleep(1.0)
    before = {name: resident_mb(pid) for name, pid in node_pids.items()}
    outcomes = {"finished": 0, "refused": 0, "out of time": 0}

    with grpc.insecure_channel(cluster.endpoint, options=options.CHANNEL) as channel:
        coordinator = pb_grpc.CoordinatorStub(channel)

        @FUZZ
        @given(generate_requests())
        def fuzz(request: pb.GenerateRequest) -> None:
            try:
                events = list(coordinator.Generate(request, timeout=REQUEST_TIMEOUT_S))
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    outcomes["out of time"] += 1
                else:
                    outcomes["refused"] += 1
                    assert error.code() in REFUSAL_CODES
                    assert_a_sentence(error)
            else:
                outcomes["finished"] += 1
                assert events[-1].finished.stop_reason in ENDS
            assert all(process.poll() is None for process in cluster.processes.values())

        fuzz()
    time.sleep(1.0)
    after = {name: resident_mb(pid) for name, pid in node_pids.items()}
    assert outcomes["finished"] and outcomes["refused"], outcomes
    for name in node_pids:
        assert after[name] - before[name] <= MEMORY_BOUND_MB, (name, before[name], after[name])
    with Client(cluster.endpoint) as client:
        assert generate_on(client, CLUSTER_PROMPTS[0]).token_ids == reference(CLUSTER_PROMPTS[0])
