"""The ring data path on real `speed node` processes, with this test in the coordinator's place: it assigns
a placement, opens sequences on its direct link to each node and reads the committed tokens, while the nodes
forward hidden states, corrections and commits to each other over their direct links."""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
import pytest

from nodes.link_probe import LinkProbe
from nodes.peer_links import Dialler, LinkRefused
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import load_cluster
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import load_secret
from runtime.wire.frames import HANDSHAKE_BYTES, frame, read_frame
from runtime.wire.sampling import sampling_to_wire
from runtime.wire.tensor import pack
from tests.conftest import CLUSTER_NEW_TOKENS, CLUSTER_PROMPTS, free_port, write_cluster
from tests.support import NodeProcess, ring_link, running_nodes

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

INCARNATION = 7
SEQ_IDS = itertools.count(1)


class Coordinator:
    """What the coordinator does on the ring: a channel per node for Assign, and a link per node for the ring."""

    def __init__(self, nodes: dict[str, NodeProcess], epoch: int):
        spec = load_cluster(nodes["edge-1"].cluster)
        self.epoch = epoch
        self.channels = {n.name: nodes[n.name].channel() for n in spec.nodes}
        placement = [pb.StagePlace(stage=stage, node=n.name, address=n.address, link_address=nodes[n.name].link_address())
                     for n in spec.nodes for stage in n.stages]
        for n in spec.nodes:
            pb_grpc.NodeStub(self.channels[n.name]).Assign(pb.AssignRequest(
                incarnation=INCARNATION, stages=n.stages, placement=placement, epoch=epoch,
                assign_key=nodes[n.name].assign_key), timeout=10)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.links = []
        for n in spec.nodes:
            link, answers, refusal = ring_link(nodes[n.name], INCARNATION, epoch)
            assert refusal == ""
            self.links.append(link)
            threading.Thread(target=self._read, args=(answers,), daemon=True).start()

    def _read(self, answers: BinaryIO) -> None:
        with answers:
            while (payload := read_frame(answers, 1 << 24)) is not None:
                self.events.put(pb.RingEvents.FromString(payload))

    def send(self, **fields) -> None:
        for link in self.links:
            link.sendall(frame(pb.RingControl(incarnation=INCARNATION, epoch=self.epoch, **fields).SerializeToString()))

    def decode(self, prompt_ids: list[int], sampling: SamplingParams, new_tokens: int, window: int) -> list[int]:
        seq_id = next(SEQ_IDS)
        self.send(opens=[open_message(seq_id, prompt_ids, sampling, new_tokens, window)])
        tokens, deadline = {}, time.monotonic() + 60
        while len(tokens) < new_tokens and time.monotonic() < deadline:
            events = self.events.get(timeout=60)
            assert not events.failed, events.failed[0].message
            tokens |= {c.position: c.token for c in events.commits if c.seq_id == seq_id}
        self.send(closes=[seq_id])
        ordered = [tokens[p] for p in sorted(tokens)]
        eos = load_bundle().eos_token_id  # nodes know no end: the coordinator cuts the text there
        return ordered[:ordered.index(eos)] if eos in ordered else ordered

    def close(self) -> None:
        for link in self.links:
            link.shutdown(socket.SHUT_RDWR)  # its reading end holds the connection open
            link.close()
        for channel in self.channels.values():
            channel.close()


def open_message(seq_id: int, prompt_ids: list[int], sampling: SamplingParams, new_tokens: int,
                 window: int) -> pb.RingOpen:
    return pb.RingOpen(sequence=pb.OpenSequence(seq_id=seq_id, sampling=sampling_to_wire(sampling),
                                                capacity=len(prompt_ids) + new_tokens),
                       prefill=prompt_ids, last_position=len(prompt_ids) + new_tokens - 2, window=window,
                       prompt_tokens=len(prompt_ids))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Iterator[dict[str, NodeProcess]]:
    path = write_cluster(tmp_path_factory.mktemp("ring-node"), stages=[[0], [1, 2]])
    with running_nodes(path, "edge-1", "edge-2") as started:
        yield started


@contextmanager
def coordinator(nodes: dict[str, NodeProcess], epoch: int) -> Iterator[Coordinator]:
    driver = Coordinator(nodes, epoch)
    try:
        yield driver
    finally:
        driver.close()


@pytest.mark.parametrize("window", [0, 1, 8], ids=["sequential", "window-1", "window-8"])
def test_nodes_forwarding_to_each_other_commit_the_reference_tokens(nodes, reference, window):
    tokenizer = load_bundle().tokenizer()
    with coordinator(nodes, epoch=window + 1) as driver:
        for prompt in CLUSTER_PROMPTS[:2]:
            for sampling in (GREEDY, SamplingParams(temperature=0.8, top_k=40, seed=7)):
                ids = tokenizer.encode(prompt).ids
                assert driver.decode(ids, sampling, CLUSTER_NEW_TOKENS, window) == reference(prompt, sampling)


def link_to(node: NodeProcess) -> socket.socket:
    """A direct link to `node` as another node of the cluster dials it."""
    return Dialler("edge-1", load_secret(load_cluster(node.cluster)))(node.name, node.link_address())


@pytest.mark.parametrize("epoch", [20, 19, 2**40], ids=["live", "stale", "never"])
def test_a_forwarded_state_of_the_wrong_shape_ends_its_link_with_a_sentence_whatever_its_epoch(nodes, epoch, reference):
    """The same answer at every epoch: no refusal tells which epoch is the live one."""
    tokenizer = load_bundle().tokenizer()
    with coordinator(nodes, epoch=20) as driver, link_to(nodes["edge-2"]) as link:
        bad = pb.Forwarded(incarnation=INCARNATION, epoch=epoch, hops=[pb.RingHop(
            seq_id=1, gen=0, stage=1, start=0, tokens=[1, 2], hidden=pack(np.zeros((3, 7), np.float32)))])
        link.sendall(frame(bad.SerializeToString()))
        with link.makefile("rb") as answers:
            refusal = pb.LinkAnswer.FromString(read_frame(answers, HANDSHAKE_BYTES)).refusal
            assert read_frame(answers, HANDSHAKE_BYTES) is None  # and the link is closed
        assert "hidden state must have shape" in refusal and "\n" not in refusal and len(refusal) < 1000
        assert refusal in nodes["edge-2"].stderr()
        prompt = CLUSTER_PROMPTS[2]  # the node goes on serving
        assert driver.decode(tokenizer.encode(prompt).ids, GREEDY, 16, 4) == reference(prompt, GREEDY)[:16]


def test_a_link_without_the_cluster_secret_is_refused_with_a_sentence(nodes):
    with coordinator(nodes, epoch=25), pytest.raises(LinkRefused) as refused:
        Dialler("edge-1", "0" * 64)("edge-2", nodes["edge-2"].link_address())
    assert "did not carry the cluster's secret" in str(refused.value)


def test_messages_of_another_placement_are_dropped_and_decoding_goes_on(nodes, reference):
    tokenizer = load_bundle().tokenizer()
    with coordinator(nodes, epoch=30) as driver, link_to(nodes["edge-2"]) as link:
        stale = pb.Forwarded(incarnation=INCARNATION, epoch=29, commits=[pb.RingCommit(seq_id=1, position=0, token=5)],
                             hops=[pb.RingHop(seq_id=1, gen=0, stage=1, start=0, tokens=[1],
                                              hidden=pack(np.zeros((1, 256), np.float32)))])
        link.sendall(frame(stale.SerializeToString()))
        prompt = CLUSTER_PROMPTS[3]
        assert driver.decode(tokenizer.encode(prompt).ids, GREEDY, 16, 4) == reference(prompt, GREEDY)[:16]


def test_a_ring_link_without_an_assigned_placement_is_refused_with_a_sentence(nodes):
    with nodes["edge-1"].channel() as channel:
        pb_grpc.NodeStub(channel).Assign(pb.AssignRequest(incarnation=INCARNATION, stages=[0],
                                                          assign_key=nodes["edge-1"].assign_key), timeout=10)  # lockstep
    link, answers, refusal = ring_link(nodes["edge-1"], INCARNATION, epoch=0)
    with link, answers:
        assert refusal == "node edge-1 runs the ring data path only for the placement its coordinator assigned last"
        assert read_frame(answers, HANDSHAKE_BYTES) is None  # and the link is closed


def test_a_ring_link_of_another_placement_or_without_the_assign_key_is_refused(nodes, reference):
    with coordinator(nodes, epoch=40) as driver:
        for binding, refused in [(dict(epoch=39), "only for the placement its coordinator assigned last"),
                                 (dict(assign_key="0" * 32), "only from the coordinator it registered with"),
                                 ({}, "already has its coordinator's link for this placement")]:
            link, answers, refusal = ring_link(nodes["edge-2"], INCARNATION, **{"epoch": 40} | binding)
            with link, answers:
                assert refused in refusal and "\n" not in refusal
        prompt = CLUSTER_PROMPTS[1]  # the coordinator's own link still serves
        tokenizer = load_bundle().tokenizer()
        assert driver.decode(tokenizer.encode(prompt).ids, GREEDY, 16, 4) == reference(prompt, GREEDY)[:16]


def test_the_ring_stops_when_its_coordinator_link_ends(nodes, reference):
    """The node frees the placement's sequences: nobody reads their commits any more. A new assignment serves."""
    tokenizer = load_bundle().tokenizer()
    prompt = CLUSTER_PROMPTS[0]
    with nodes["edge-1"].channel() as channel:
        stub = pb_grpc.NodeStub(channel)
        with coordinator(nodes, epoch=50) as driver:
            driver.send(opens=[open_message(next(SEQ_IDS), tokenizer.encode(prompt).ids, GREEDY, 64, 4)])
            assert driver.events.get(timeout=60).commits  # decoding
            assert stub.Info(pb.InfoRequest(), timeout=10).open_sequences == 1
        deadline = time.monotonic() + 30
        while stub.Info(pb.InfoRequest(), timeout=10).open_sequences and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub.Info(pb.InfoRequest(), timeout=10).open_sequences == 0
    with coordinator(nodes, epoch=51) as driver:
        assert driver.decode(tokenizer.encode(prompt).ids, GREEDY, 16, 4) == reference(prompt, GREEDY)[:16]


def test_a_control_message_the_node_cannot_read_ends_the_coordinator_link_with_a_sentence(nodes, reference):
    tokenizer = load_bundle().tokenizer()
    with coordinator(nodes, epoch=60) as driver:
        driver.links[1].sendall(frame(b"\xff\xff\xff"))
        refusal = driver.events.get(timeout=60).refusal
        assert refusal == "node edge-2 cannot read a ring control message"
        assert refusal in nodes["edge-2"].stderr()
    prompt = CLUSTER_PROMPTS[2]
    with coordinator(nodes, epoch=61) as driver:  # the node serves the next placement
        assert driver.decode(tokenizer.encode(prompt).ids, GREEDY, 16, 4) == reference(prompt, GREEDY)[:16]


def test_a_probe_link_echoes_and_times_the_link_to_a_node(nodes):
    dial = Dialler("edge-1", load_secret(load_cluster(nodes["edge-2"].cluster)))
    with dial("edge-2", nodes["edge-2"].link_address(), probe=True) as link, link.makefile("rb") as echoes:
        link.sendall(frame(b"ping") + frame(b"again"))
        assert [read_frame(echoes, 16), read_frame(echoes, 16)] == [b"ping", b"again"]
    probe = LinkProbe(dial)
    probe.measure({"edge-2": nodes["edge-2"].link_address(), "nowhere": f"127.0.0.1:{free_port()}"})
    deadline = time.monotonic() + 30
    while not probe.times() and time.monotonic() < deadline:
        time.sleep(0.05)
    [measured] = probe.times()  # a peer that does not answer is left out
    assert measured.node == "edge-2" and 0 < measured.rtt_ms < 1000
