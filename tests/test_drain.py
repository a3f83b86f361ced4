"""`speed node --drain` on real processes: a node hands its stages over mid-generation and stops, no
request fails and every text is the reference; a node whose stages nobody else can run stays."""

from __future__ import annotations

import pytest

from runtime.client import Client
from runtime.core.node_state import NodeState
from runtime.wire.enums import node_state_of
from tests.conftest import CLUSTER_PROMPTS as PROMPTS
from tests.conftest import assert_one_line_error, decoding, generate_on, run_speed, running_cluster

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

LONG = 160  # tokens: the drain lands while the requests decode


@pytest.mark.parametrize("placement", ["file", "auto"])
def test_a_node_drained_under_load_hands_its_stages_over_and_no_text_changes(tmp_path, reference, placement):
    with running_cluster(tmp_path, extra_top_keys=f"placement: {placement}\n") as cluster, \
            Client(cluster.endpoint) as client:
        with decoding(client, PROMPTS, LONG) as results:
            drained = run_speed("node", "--cluster", str(cluster.spec.path), "--name", "edge-2", "--drain")
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.startswith("node edge-2 drained and stopping; the stages run on 0: edge-")
        assert "edge-2" not in drained.stdout.split("run on")[1]
        assert results == {i: reference(PROMPTS[i], max_new_tokens=LONG) for i in range(len(PROMPTS))}

        assert cluster.processes["edge-2"].wait(timeout=30) == 0  # it stopped by itself
        status = {node.name: node for node in client.status().nodes}
        assert node_state_of(status["edge-2"]) == NodeState.LEFT and list(status["edge-2"].hosting) == []
        assert generate_on(client, PROMPTS[0], speculative=True).token_ids == reference(PROMPTS[0])
        log = cluster.log_of("coordinator").read_text()
        assert "edge-2 draining" in log and "node edge-2 (127.0.0.1:" in log and "failover" not in log

        cluster.start_process("edge-2")  # a drained node that starts again serves again
        cluster.wait_ready(60)
        assert generate_on(client, PROMPTS[1], speculative=True).token_ids == reference(PROMPTS[1])


def test_a_node_whose_stages_nobody_else_can_run_is_not_drained(tmp_path, reference):
    with running_cluster(tmp_path, stages=[[0, 1, 2]]) as cluster, Client(cluster.endpoint) as client:
        refused = run_speed("node", "--cluster", str(cluster.spec.path), "--name", "edge-1", "--drain")
        assert_one_line_error(refused, "node edge-1 cannot leave now: no other serving node can run stage 0; start one "
                                       "that lists it (under stages or standby_stages) and drain again")
        assert cluster.processes["edge-1"].poll() is None
        assert generate_on(client, PROMPTS[2]).token_ids == reference(PROMPTS[2])


def test_draining_a_node_that_is_not_running_says_so(tmp_path):
    from tests.conftest import write_cluster

    assert_one_line_error(run_speed("node", "--cluster", str(write_cluster(tmp_path)), "--name", "edge-1", "--drain"),
                          "node edge-1 is not running at 127.0.0.1:")
