"""A node daemon as the coordinator sees it: real `speed node` processes driven over real gRPC.

edge-1 hosts stage 0 and edge-2 hosts stages 1-2 of the tiny bundle; no coordinator runs, so both keep
retrying registration in the background while they serve.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from nodes.daemon import STOP_GRACE_S
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import load_cluster, parse_address
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.tensor import pack, unpack
from tests.conftest import TINY, run_speed, write_cluster
from tests.support import NodeProcess, node_stubs, running_nodes, steps, stop_node

STAGES = [[0], [1, 2]]  # edge-1, edge-2
PROMPT = 5
SEQ_IDS = itertools.count(1000)  # every test opens its own sequence ids on the shared nodes


@pytest.fixture(scope="module")
def cluster(tiny_bundle, tmp_path_factory) -> Path:
    return write_cluster(tmp_path_factory.mktemp("node-service"), bundle=tiny_bundle, stages=STAGES)


@pytest.fixture(scope="module")
def nodes(cluster) -> Iterator[dict[str, NodeProcess]]:
    with running_nodes(cluster, "edge-1", "edge-2") as started:
        yield started


@pytest.fixture(scope="module")
def stubs(nodes) -> Iterator[dict[str, pb_grpc.NodeStub]]:
    with node_stubs(nodes) as made:
        yield made


# --- step messages -----------------------------------------------------------------------------


def one_step(stub: pb_grpc.NodeStub, batch: pb.StepBatch) -> pb.StepResults:
    with steps(stub) as stream:
        return stream.step(batch)


def refusal_of(stub: pb_grpc.NodeStub, batch: pb.StepBatch, *, after: tuple[pb.StepBatch, ...] = ()) -> grpc.RpcError:
    """The error a fresh stream gets for `batch`, sent after the valid batches `after`."""
    with steps(stub) as stream:
        for setup in after:
            stream.step(setup)
        return stream.refused(batch)


def opening(seq_id: int, capacity: int = 32) -> pb.OpenSequence:
    return pb.OpenSequence(seq_id=seq_id, sampling=pb.Sampling(), capacity=capacity)


def tokens_item(seq_id: int, start: int, length: int, tokens: list[int] | None = None) -> pb.StepItem:
    tokens = [(7 * p + 3) % TINY.vocab_size for p in range(start, start + length)] if tokens is None else tokens
    return pb.StepItem(seq_id=seq_id, start=start, length=length, stage=0, tokens=tokens)


def hidden_item(seq_id: int, start: int, length: int, *, stage: int = 1, shape: tuple[int, ...] | None = None,
                dtype=np.float32) -> pb.StepItem:
    shape = (length, TINY.d_model) if shape is None else shape
    hidden = np.random.default_rng(start).standard_normal(shape).astype(dtype)
    return pb.StepItem(seq_id=seq_id, start=start, length=length, stage=stage, hidden=pack(hidden))


def prompt_batch(node: str, seq_id: int) -> pb.StepBatch:
    """Open a sequence and run its prompt at the node's first stage."""
    item = tokens_item(seq_id, 0, PROMPT) if node == "edge-1" else hidden_item(seq_id, 0, PROMPT)
    return pb.StepBatch(opens=[opening(seq_id)], items=[item])


def next_batch(node: str, seq_id: int) -> pb.StepBatch:
    """The step after the prompt: one more position, and on edge-2 the prompt's stage 2 as well."""
    if node == "edge-1":
        return pb.StepBatch(items=[tokens_item(seq_id, PROMPT, 1)])
    return pb.StepBatch(items=[hidden_item(seq_id, PROMPT, 1), pb.StepItem(seq_id=seq_id, start=0, length=PROMPT, stage=2)])


def open_sequences(stub: pb_grpc.NodeStub) -> int:
    return stub.Info(pb.InfoRequest(), timeout=5).open_sequences


def close(stub: pb_grpc.NodeStub, *seq_ids: int) -> None:
    one_step(stub, pb.StepBatch(closes=seq_ids))


def summary(reply: pb.StepResults) -> list[tuple]:
    return [(r.seq_id, r.start, r.prediction, r.HasField("hidden")) for r in reply.results]


# --- what a node reports and runs ---------------------------------------------------------------


def test_info_describes_the_node(stubs, tiny_bundle):
    sha256 = load_bundle(tiny_bundle).sha256
    for name, stages in zip(("edge-1", "edge-2"), STAGES):
        info = stubs[name].Info(pb.InfoRequest(), timeout=5)
        assert (info.name, list(info.stages), info.bundle_sha256) == (name, stages, sha256)
        assert (info.provider, info.threads, info.device) == ("CPUExecutionProvider", 1, "cpu")
        assert info.max_sequences == 8 and info.open_sequences == 0


def test_prompt_at_stage_0_hands_its_hidden_state_on(stubs):
    seq_id = next(SEQ_IDS)
    reply = one_step(stubs["edge-1"], prompt_batch("edge-1", seq_id))
    close(stubs["edge-1"], seq_id)
    [result] = reply.results
    assert (result.seq_id, result.start) == (seq_id, 0)
    assert 0 <= result.prediction < TINY.vocab_size
    hidden = unpack(result.hidden, dtype="float32", shape=(PROMPT, TINY.d_model), what="the handoff")
    assert np.isfinite(hidden).all()


def test_a_two_stage_node_runs_its_second_stage_the_next_step(stubs):
    seq_id = next(SEQ_IDS)
    with steps(stubs["edge-2"]) as stream:
        first = stream.step(prompt_batch("edge-2", seq_id))
        second = stream.step(next_batch("edge-2", seq_id))
    close(stubs["edge-2"], seq_id)
    # stage 1's next stage runs on this node and stage 2 is the last: no hidden state goes back
    assert summary(first) == [(seq_id, 0, first.results[0].prediction, False)]
    assert sorted((r.start, r.HasField("hidden")) for r in second.results) == [(0, False), (PROMPT, False)]
    assert all(0 <= r.prediction < TINY.vocab_size for r in [*first.results, *second.results])


# --- bad steps: refused whole, with a status and a sentence, and nobody else notices ----------------


def never_opened(s):
    return (), pb.StepBatch(items=[tokens_item(s, 0, PROMPT)]), grpc.StatusCode.NOT_FOUND, [f"sequence {s}", "not open"]


def stage_not_hosted(s):
    batch = pb.StepBatch(opens=[opening(s)], items=[hidden_item(s, 0, PROMPT, stage=1)])
    return (), batch, grpc.StatusCode.INVALID_ARGUMENT, ["hosts stages [0]", "not stage 1"]


def hidden_of_wrong_shape(s):
    batch = pb.StepBatch(opens=[opening(s)], items=[hidden_item(s, 0, PROMPT, shape=(PROMPT + 1, TINY.d_model))])
    return (), batch, grpc.StatusCode.INVALID_ARGUMENT, ["shape", f"[{PROMPT}, {TINY.d_model}]"]


def hidden_of_wrong_dtype(s):
    batch = pb.StepBatch(opens=[opening(s)], items=[hidden_item(s, 0, PROMPT, dtype=np.float64)])
    return (), batch, grpc.StatusCode.INVALID_ARGUMENT, ["float32", "float64"]


def token_past_the_vocabulary(s):
    batch = pb.StepBatch(opens=[opening(s)], items=[tokens_item(s, 0, 3, [1, TINY.vocab_size, 2])])
    return (), batch, grpc.StatusCode.INVALID_ARGUMENT, ["token ids", f"0..{TINY.vocab_size - 1}"]


def negative_token(s):
    batch = pb.StepBatch(opens=[opening(s)], items=[tokens_item(s, 0, 3, [1, -1, 2])])
    return (), batch, grpc.StatusCode.INVALID_ARGUMENT, ["token ids", f"0..{TINY.vocab_size - 1}"]


def fewer_tokens_than_length(s):
    batch = pb.StepBatch(opens=[opening(s)], items=[tokens_item(s, 0, PROMPT, [1, 2, 3])])
    return (), batch, grpc.StatusCode.INVALID_ARGUMENT, [f"needs {PROMPT} token ids"]


def start_past_the_cache(s):
    batch = pb.StepBatch(opens=[opening(s)], items=[tokens_item(s, 3, 2)])
    return (), batch, grpc.StatusCode.INVALID_ARGUMENT, ["item at 3", "holds 0 positions"]


def opened_twice(s):
    batch = pb.StepBatch(opens=[opening(s)])
    return (batch,), batch, grpc.StatusCode.ALREADY_EXISTS, [f"sequence {s}", "already open"]


def truncation_past_the_cache(s):
    batch = pb.StepBatch(truncations=[pb.Truncation(seq_id=s, stage=0, length=PROMPT + 1)])
    return (prompt_batch("edge-1", s),), batch, grpc.StatusCode.INVALID_ARGUMENT, [f"truncate {PROMPT}", f"to {PROMPT + 1}"]


def second_stage_never_fed(s):
    batch = pb.StepBatch(opens=[opening(s)], items=[pb.StepItem(seq_id=s, start=0, length=PROMPT, stage=2)])
    return (), batch, grpc.StatusCode.FAILED_PRECONDITION, ["did not run stage 1"]


BAD_STEPS = {
    "edge-1": [never_opened, stage_not_hosted, token_past_the_vocabulary, negative_token, fewer_tokens_than_length,
               start_past_the_cache, opened_twice, truncation_past_the_cache],
    "edge-2": [never_opened, hidden_of_wrong_shape, hidden_of_wrong_dtype, second_stage_never_fed],
}


@pytest.fixture(scope="module")
def undisturbed(stubs) -> dict[str, list[list[tuple]]]:
    """What a sequence's prompt step and next step give on each node when nothing else happens."""
    runs = {}
    for node, stub in stubs.items():
        seq_id = next(SEQ_IDS)
        with steps(stub) as stream:
            runs[node] = [summary(stream.step(prompt_batch(node, seq_id))), summary(stream.step(next_batch(node, seq_id)))]
        close(stub, seq_id)
    return runs


def renamed(results: list[tuple], seq_id: int) -> list[tuple]:
    return sorted((seq_id, *rest) for _, *rest in results)


@pytest.mark.parametrize("node, case", [(node, case) for node, cases in BAD_STEPS.items() for case in cases],
                         ids=lambda value: getattr(value, "__name__", value))
def test_a_bad_step_is_refused_and_disturbs_no_one(stubs, nodes, undisturbed, node, case):
    stub, bystander, seq_id = stubs[node], next(SEQ_IDS), next(SEQ_IDS)
    with steps(stub) as other_client:
        assert renamed(summary(other_client.step(prompt_batch(node, bystander))), 0) == renamed(undisturbed[node][0], 0)
        setup, batch, code, words = case(seq_id)
        error = refusal_of(stub, batch, after=setup)
        assert error.code() == code, error.details()
        for word in words:
            assert word in error.details()
        assert nodes[node].process.poll() is None
        after = summary(other_client.step(next_batch(node, bystander)))
    close(stub, bystander, seq_id)
    assert renamed(after, bystander) == renamed(undisturbed[node][1], bystander)


def test_a_batch_with_one_bad_item_runs_none_of_it(stubs):
    good, never = next(SEQ_IDS), next(SEQ_IDS)
    before = open_sequences(stubs["edge-1"])
    batch = pb.StepBatch(opens=[opening(good)], items=[tokens_item(good, 0, PROMPT), tokens_item(never, 0, PROMPT)])
    assert refusal_of(stubs["edge-1"], batch).code() == grpc.StatusCode.NOT_FOUND
    assert open_sequences(stubs["edge-1"]) == before
    follow_up = pb.StepBatch(items=[tokens_item(good, 0, PROMPT)])
    error = refusal_of(stubs["edge-1"], follow_up)
    assert error.code() == grpc.StatusCode.NOT_FOUND and f"sequence {good}" in error.details()


def test_a_second_stage_item_of_another_length_than_its_first_stage_is_refused(stubs):
    seq_id = next(SEQ_IDS)
    stub = stubs["edge-2"]
    try:
        bad = pb.StepBatch(items=[pb.StepItem(seq_id=seq_id, start=0, length=PROMPT - 2, stage=2)])
        error = refusal_of(stub, bad, after=(prompt_batch("edge-2", seq_id),))
    finally:
        close(stub, seq_id)
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), error.details()


# --- closing and stopping ------------------------------------------------------------------------


def test_closing_frees_the_sequence(stubs):
    stub, seq_id = stubs["edge-1"], next(SEQ_IDS)
    before = open_sequences(stub)
    with steps(stub) as stream:
        stream.step(prompt_batch("edge-1", seq_id))
        assert open_sequences(stub) == before + 1
        # closes apply before anything else in a message, so its slot serves the message's opens
        stream.step(pb.StepBatch(closes=[seq_id]))
    assert open_sequences(stub) == before
    error = refusal_of(stub, pb.StepBatch(items=[tokens_item(seq_id, PROMPT, 1)]))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "not open" in error.details()
    # and the id may be opened afresh, from position 0
    assert summary(one_step(stub, prompt_batch("edge-1", seq_id)))[0][:2] == (seq_id, 0)
    close(stub, seq_id)
    assert open_sequences(stub) == before


def test_sigterm_stops_the_node_gracefully_and_ends_the_step_stream_held_open_between_steps(tiny_bundle, tmp_path):
    """A coordinator keeps its step stream open between steps: the node ends it when it stops instead of waiting
    out its grace for it (which every idle node did, so each stop of a cluster took STOP_GRACE_S)."""
    cluster = write_cluster(tmp_path, bundle=tiny_bundle, stages=STAGES)
    with running_nodes(cluster, "edge-1") as started, node_stubs(started) as stubs, steps(stubs["edge-1"]) as stream:
        stream.step(prompt_batch("edge-1", next(SEQ_IDS)))
        node = started["edge-1"]
        started_at = time.monotonic()
        status = stop_node(node)
        took = time.monotonic() - started_at
        assert stream.refused(pb.StepBatch()).code() in {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
    assert status == 0, node.stderr()
    assert took < STOP_GRACE_S, node.stderr()
    assert "stopped" in node.stderr()


# --- a node that cannot start says why in one line ----------------------------------------------


def test_a_name_not_in_the_cluster_file(tiny_bundle, tmp_path):
    result = run_speed("node", "--cluster", str(write_cluster(tmp_path, bundle=tiny_bundle, stages=STAGES)),
                       "--name", "nope")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert "'nope'" in line and "edge-1, edge-2" in line


def test_a_port_already_taken(tiny_bundle, tmp_path):
    cluster = write_cluster(tmp_path, bundle=tiny_bundle, stages=STAGES)
    address = load_cluster(cluster).node("edge-1").address
    with socket.socket() as holder:
        holder.bind(parse_address(address))
        holder.listen()
        result = run_speed("node", "--cluster", str(cluster), "--name", "edge-1", timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"cannot listen on {address}" in result.stderr
