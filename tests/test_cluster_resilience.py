"""A cluster of real processes under load, restarts and lost nodes: it keeps serving, with the same text.

Every loop here is bounded and every server listens on loopback only.
"""

from __future__ import annotations

import os
import random
import signal
import time
import urllib.request

import pytest

from runtime.client import Busy, Client, DeadlineExceeded, Unavailable
from runtime.core.cluster_file import load_cluster
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.security import member_channel
from tests.conftest import CLUSTER_PROMPTS as PROMPTS
from tests.conftest import generate_on, in_threads, running_cluster

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

SAMPLED = SamplingParams(temperature=0.8, top_k=40, seed=7)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("resilience")) as running:
        yield running


@pytest.fixture(scope="module")
def lockstep_cluster(tmp_path_factory):
    """On lockstep a node keeps a lost coordinator's sequences until its successor frees them; on the ring the
    end of the coordinator's stream frees them at once."""
    with running_cluster(tmp_path_factory.mktemp("lockstep"), extra_top_keys="data_path: lockstep\n") as running:
        yield running


def held_by_nodes(cluster) -> dict[str, int]:
    """Sequences each node really holds, asked of the node itself."""
    held = {}
    for node in load_cluster(cluster.path).nodes:
        with member_channel(cluster.spec, node.address) as channel:
            held[node.name] = pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=5).open_sequences
    return held


def wait_until_nodes_hold_nothing(cluster, timeout_s: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    held = held_by_nodes(cluster)
    while any(held.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        held = held_by_nodes(cluster)
    return held


def test_32_clients_with_3_requests_each_all_succeed_and_leave_nothing_held(cluster, reference):
    modes = [({"speculative": True}, GREEDY), ({"speculative": False}, GREEDY), ({"speculative": True}, SAMPLED)]

    def client_run(index: int) -> list[tuple]:
        done = []
        with Client(cluster.endpoint) as client:
            for request in range(3):
                options, sampling = modes[(index + request) % 3]
                prompt = PROMPTS[(index + request) % len(PROMPTS)]
                result = generate_on(client, prompt, sampling, max_new_tokens=48, timeout_s=300, **options)
                done.append((prompt, sampling, result.token_ids))
        return done

    by_client, errors = in_threads(client_run, 32, timeout_s=600)
    assert not errors, errors[:3]
    results = [outcome for done in by_client.values() for outcome in done]
    assert len(results) == 96
    for prompt, sampling, token_ids in results:
        if sampling == GREEDY:
            assert token_ids == reference(prompt, max_new_tokens=48), prompt
        else:
            assert len(token_ids) == 48 or token_ids == reference(prompt, sampling, max_new_tokens=48)
    assert wait_until_nodes_hold_nothing(cluster) == {"edge-1": 0, "edge-2": 0, "edge-3": 0}
    with Client(cluster.endpoint) as client:
        status = client.status()
    assert status.active_requests == 0 and status.queued_requests == 0


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_node_killed_at_a_random_tick_is_replaced_and_the_request_keeps_its_text(cluster, reference, stage, sampling):
    victim = f"edge-{stage + 1}"
    prompt = PROMPTS[stage]
    chunks_before_kill = random.Random(f"{stage}-{sampling.seed}").randrange(1, 12)
    with Client(cluster.endpoint) as client:
        stream = client.generate(prompt, max_new_tokens=48, temperature=sampling.temperature, top_k=sampling.top_k,
                                 seed=sampling.seed, timeout_s=120)
        received = []
        for index, chunk in enumerate(stream):
            received += chunk.token_ids
            if index + 1 == chunks_before_kill:
                os.kill(cluster.processes[victim].pid, signal.SIGKILL)
        assert received == stream.result().token_ids == reference(prompt, sampling, max_new_tokens=48)
    cluster.processes.pop(victim).wait()
    cluster.start_process(victim)
    cluster.wait_ready(60)  # it registered again and runs its own stage


def test_a_killed_coordinator_is_named_to_its_client_and_its_successor_frees_the_old_sequences(lockstep_cluster,
                                                                                               reference):
    with Client(lockstep_cluster.endpoint) as client:
        stream = client.generate(PROMPTS[0], max_new_tokens=900, ignore_eos=True, timeout_s=120)
        chunks = iter(stream)
        next(chunks)
        os.kill(lockstep_cluster.processes["coordinator"].pid, signal.SIGKILL)
        with pytest.raises(Unavailable, match=f"lost the coordinator {lockstep_cluster.endpoint} during the request"):
            for _ in chunks:
                pass
    lockstep_cluster.processes.pop("coordinator").wait()
    assert any(held_by_nodes(lockstep_cluster).values())  # the dead coordinator's sequence is still there
    lockstep_cluster.start_process("coordinator")
    lockstep_cluster.wait_ready(60)
    assert wait_until_nodes_hold_nothing(lockstep_cluster) == {"edge-1": 0, "edge-2": 0, "edge-3": 0}
    def one(index: int) -> list[int]:
        with Client(lockstep_cluster.endpoint) as client:
            return generate_on(client, PROMPTS[index % 4], max_new_tokens=24).token_ids

    results, errors = in_threads(one, 12)
    assert not errors
    assert all(results[i] == reference(PROMPTS[i % 4], max_new_tokens=24) for i in range(12))


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_resumed_request_survives_its_coordinator_with_the_same_text(cluster, reference, sampling):
    with Client(cluster.endpoint) as client:
        stream = client.generate(PROMPTS[1], max_new_tokens=64, temperature=sampling.temperature, top_k=sampling.top_k,
                                 seed=sampling.seed, timeout_s=120, resume=True)
        received, pieces = [], []
        for index, chunk in enumerate(stream):
            received += chunk.token_ids
            pieces.append(chunk.text)
            if index == 3:
                os.kill(cluster.processes["coordinator"].pid, signal.SIGKILL)
                cluster.processes.pop("coordinator").wait()
                cluster.start_process("coordinator")
        result = stream.result()
    assert received == result.token_ids == reference(PROMPTS[1], sampling, max_new_tokens=64)
    assert "".join(pieces) == result.text
    cluster.wait_ready(60)


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory):
    """One sequence slot per node, a queue of one, and metrics on every process; lockstep, whose metrics time
    every node's steps."""
    with running_cluster(tmp_path_factory.mktemp("small"), metrics=True, extra_node_keys="    max_sequences: 1\n",
                         extra_coordinator_keys="  max_queue: 1\n", extra_top_keys="data_path: lockstep\n") as running:
        yield running


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return response.read().decode()


def test_a_full_queue_refuses_with_a_sentence_and_a_waiting_request_keeps_its_deadline(small_cluster, reference):
    with Client(small_cluster.endpoint) as client:
        running = client.generate(PROMPTS[0], max_new_tokens=1000, ignore_eos=True, timeout_s=120)
        chunks = iter(running)
        next(chunks)  # it holds the only slot
        waiting = client.generate(PROMPTS[1], max_new_tokens=8, timeout_s=120)
        deadline = time.monotonic() + 10
        while client.status().queued_requests < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        status = client.status()
        assert (status.active_requests, status.queued_requests, status.max_queue) == (1, 1, 1)
        with pytest.raises(Busy, match=r"already wait, as many as coordinator.max_queue \(1\) allows; retry later"):
            client.generate(PROMPTS[2], max_new_tokens=8).result()
        running.cancel()
        assert waiting.result().token_ids == reference(PROMPTS[1], max_new_tokens=8)

        blocker = client.generate(PROMPTS[0], max_new_tokens=1000, ignore_eos=True, timeout_s=120)
        next(iter(blocker))
        with pytest.raises(DeadlineExceeded, match="0.5 s deadline .while it waited for a free sequence slot"):
            client.generate(PROMPTS[3], max_new_tokens=8, timeout_s=0.5).result()
        blocker.cancel()
        while client.status().active_requests and time.monotonic() < deadline + 20:
            time.sleep(0.05)
        with pytest.raises(DeadlineExceeded, match="1 s deadline .after [0-9]+ generated token"):
            client.generate(PROMPTS[3], max_new_tokens=1000, ignore_eos=True, timeout_s=1.0).result()
        assert generate_on(client, PROMPTS[2], max_new_tokens=8).token_ids == reference(PROMPTS[2], max_new_tokens=8)
    assert wait_until_nodes_hold_nothing(small_cluster) == {"edge-1": 0, "edge-2": 0, "edge-3": 0}


def test_every_process_serves_prometheus_metrics(small_cluster):
    with Client(small_cluster.endpoint) as client:
        generate_on(client, PROMPTS[0], max_new_tokens=8)
    spec = load_cluster(small_cluster.path)
    coordinator = scrape(f"127.0.0.1:{spec.coordinator.metrics_port}")
    assert 'speed_coordinator_requests_total{outcome="completed"}' in coordinator
    assert "speed_coordinator_tokens_committed_total" in coordinator
    assert 'speed_coordinator_node_up{node="edge-2"} 1.0' in coordinator
    assert 'speed_coordinator_step_seconds_count{node="edge-3"}' in coordinator
    for node in spec.nodes:
        text = scrape(f"127.0.0.1:{node.metrics_port}")
        assert "speed_node_steps_total" in text and "speed_node_max_sequences 1.0" in text


@pytest.mark.parametrize("data_path", ["lockstep", "ring"])
def test_a_standby_node_takes_a_lost_stage_and_hands_it_back(tmp_path, reference, data_path):
    with running_cluster(tmp_path, stages=[[0], [1], [2], []],
                         extra_top_keys=f"data_path: {data_path}\n") as standby_cluster:
        with Client(standby_cluster.endpoint) as client:
            assert [list(n.hosting) for n in client.status().nodes] == [[0], [1], [2], []]
            stream = client.generate(PROMPTS[2], max_new_tokens=48, timeout_s=120)
            chunks = iter(stream)
            received = list(next(chunks).token_ids)
            os.kill(standby_cluster.processes["edge-2"].pid, signal.SIGKILL)
            received += [token for chunk in chunks for token in chunk.token_ids]
            assert received == stream.result().token_ids == reference(PROMPTS[2], max_new_tokens=48)
            assert [list(n.hosting) for n in client.status().nodes] == [[0], [], [2], [1]]
            standby_cluster.processes.pop("edge-2").wait()
            standby_cluster.start_process("edge-2")
            standby_cluster.wait_ready(60)
            assert [list(n.hosting) for n in client.status().nodes] == [[0], [1], [2], []]
