"""`placement: auto` on real processes: the coordinator gives the stages to the nodes its ring model
predicts fastest, chooses again when a node leaves or returns, and the text never changes."""

from __future__ import annotations

import os
import signal

import pytest

from deploy.launcher import LocalCluster
from runtime.client import Client
from runtime.core.cluster_file import load_cluster
from runtime.core.sampling import SamplingParams
from tests.conftest import CLUSTER_NEW_TOKENS as NEW_TOKENS
from tests.conftest import CLUSTER_PROMPTS as PROMPTS
from tests.conftest import generate_on, write_cluster

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

SLOW_LINK_MS = 40  # EMULATED one-way latency of edge-3: a hop to it costs more than the demo's whole token


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three nodes that can each host any stage of the demo (its stages share one graph); edge-3 sits
    behind a slow link, so every placement that gives it a stage is slower."""
    directory = tmp_path_factory.mktemp("auto")
    path = write_cluster(directory, extra_top_keys="placement: auto\n")
    text = path.read_text()
    third = text.index("- name: edge-3")
    slow = text[third:].replace("threads: 1\n", f"threads: 1\n    emulated_link_ms: {SLOW_LINK_MS}\n", 1)
    path.write_text(text[:third] + slow)
    assert load_cluster(path).node("edge-3").emulated_link_ms == SLOW_LINK_MS
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPEED_STATE_DIR", str(directory / "state"))
        with LocalCluster(path) as running:
            yield running


def hosting(client: Client) -> dict[str, list[int]]:
    return {node.name: list(node.hosting) for node in client.status().nodes}


def coordinator_log(cluster) -> str:
    return cluster.log_of("coordinator").read_text()


def test_the_node_behind_the_slow_link_is_given_no_stage_and_the_text_is_the_reference(cluster, reference):
    with Client(cluster.endpoint) as client:
        placed = hosting(client)
        assert placed["edge-3"] == [] and sorted(placed["edge-1"] + placed["edge-2"]) == [0, 1, 2], placed
        for speculative in (False, True):
            for sampling in (SamplingParams(), SamplingParams(temperature=0.8, top_k=40, seed=7)):
                result = generate_on(client, PROMPTS[0], sampling, speculative=speculative)
                assert result.token_ids == reference(PROMPTS[0], sampling), (speculative, sampling)
    assert "placement: auto chose" in coordinator_log(cluster)
    for name in ("edge-1", "edge-2", "edge-3"):  # each timed its passes again, alone, for the choice
        assert "timed its passes again for the coordinator: stage 0 " in cluster.log_of(name).read_text()


def test_a_node_lost_mid_generation_and_back_is_placed_again_with_the_text_unchanged(cluster, reference):
    with Client(cluster.endpoint) as client:
        busy = next(name for name, stages in hosting(client).items() if stages and name != "edge-3")
        stream = client.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS)
        chunks = iter(stream)
        received = list(next(chunks).token_ids)  # decoding has started
        os.kill(cluster.processes[busy].pid, signal.SIGKILL)
        received += [token for chunk in chunks for token in chunk.token_ids]
        assert stream.result().token_ids == received == reference(PROMPTS[1])
        cluster.processes.pop(busy).wait()
        without = hosting(client)
        assert without[busy] == [] and sorted(sum(without.values(), [])) == [0, 1, 2], without
        assert generate_on(client, PROMPTS[2], speculative=True).token_ids == reference(PROMPTS[2])

        cluster.start_process(busy)  # it registers again; the coordinator chooses among three nodes again
        cluster.wait_ready(60)
        back = hosting(client)
        assert back["edge-3"] == [] and sorted(sum(back.values(), [])) == [0, 1, 2], back
        assert generate_on(client, PROMPTS[3], speculative=True).token_ids == reference(PROMPTS[3])
