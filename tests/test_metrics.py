"""The coordinator and node metrics reach a Prometheus scrape over HTTP, and a taken port is a one-sentence error."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from nodes.node_metrics import NodeMetrics
from runtime.coordinator.metrics import CoordinatorMetrics
from runtime.core.errors import SpeedError
from tests.conftest import free_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def assert_samples(text: str, *samples: str) -> None:
    lines = set(text.splitlines())
    for sample in samples:
        assert sample in lines, f"{sample!r} missing from:\n{text}"


def test_coordinator_metrics_are_scraped():
    metrics = CoordinatorMetrics()
    metrics.request_ended("completed")
    metrics.request_ended("completed")
    metrics.request_ended("deadline_exceeded")
    metrics.set_queue_depth(3)
    metrics.set_active_requests(5)
    metrics.set_sequences("edge-1", 4)
    metrics.tokens_committed(7)
    metrics.tokens_committed(3)
    metrics.tick()
    metrics.tick()
    metrics.flips(1, flips=2, checks=10)
    metrics.flips(1, flips=1, checks=5)
    metrics.step_seconds("edge-1", 0.0003)
    metrics.step_seconds("edge-1", 2.0)
    metrics.failover("edge-2")
    metrics.sequences_replayed(6)
    metrics.node_state("edge-1", "serving")
    metrics.node_state("edge-2", "down")
    port = free_port()
    metrics.serve("127.0.0.1", port)

    text = scrape(port)
    assert_samples(
        text,
        'speed_coordinator_requests_total{outcome="completed"} 2.0',
        'speed_coordinator_requests_total{outcome="deadline_exceeded"} 1.0',
        'speed_coordinator_requests_total{outcome="rejected"} 0.0',
        "speed_coordinator_queue_depth 3.0",
        "speed_coordinator_active_requests 5.0",
        'speed_coordinator_sequences{node="edge-1"} 4.0',
        "speed_coordinator_tokens_committed_total 10.0",
        "speed_coordinator_ticks_total 2.0",
        'speed_coordinator_flips_total{boundary="1"} 3.0',
        'speed_coordinator_flip_checks_total{boundary="1"} 15.0',
        'speed_coordinator_step_seconds_bucket{le="0.0001",node="edge-1"} 0.0',
        'speed_coordinator_step_seconds_bucket{le="0.0005",node="edge-1"} 1.0',
        'speed_coordinator_step_seconds_bucket{le="10.0",node="edge-1"} 2.0',
        'speed_coordinator_step_seconds_count{node="edge-1"} 2.0',
        'speed_coordinator_failovers_total{node="edge-2"} 1.0',
        "speed_coordinator_sequences_replayed_total 6.0",
        'speed_coordinator_node_up{node="edge-1"} 1.0',
        'speed_coordinator_node_up{node="edge-2"} 0.0',
        'speed_coordinator_node_state{node="edge-1",speed_coordinator_node_state="serving"} 1.0',
        'speed_coordinator_node_state{node="edge-1",speed_coordinator_node_state="down"} 0.0',
        'speed_coordinator_node_state{node="edge-2",speed_coordinator_node_state="down"} 1.0',
    )
    assert metrics.render().decode().splitlines()[0].startswith("# HELP speed_coordinator_")


def test_node_metrics_are_scraped():
    metrics = NodeMetrics("edge-1")
    metrics.set_sequences(2)
    metrics.set_max_sequences(8)
    metrics.set_hosting(stages=3)
    metrics.step(0.004, positions=3)
    metrics.step(0.02, positions=0)  # a step message of opens and closes only: not in the recent load
    metrics.refused("INVALID_ARGUMENT")
    port = free_port()
    metrics.serve("127.0.0.1", port)

    text = scrape(port)
    assert_samples(
        text,
        "speed_node_sequences 2.0",
        "speed_node_max_sequences 8.0",
        "speed_node_hosting_stages 3.0",
        "speed_node_steps_total 2.0",
        'speed_node_step_seconds_bucket{le="0.005"} 1.0',
        'speed_node_step_seconds_bucket{le="0.025"} 2.0',
        "speed_node_step_seconds_count 2.0",
        'speed_node_refused_steps_total{code="INVALID_ARGUMENT"} 1.0',
    )
    assert "speed_coordinator_" not in text
    assert metrics.recent.read().step_ms == pytest.approx(4.0)


def test_instances_do_not_share_a_registry():
    first, second = CoordinatorMetrics(), CoordinatorMetrics()
    first.tick()
    assert "speed_coordinator_ticks_total 1.0" in first.render().decode().splitlines()
    assert "speed_coordinator_ticks_total 0.0" in second.render().decode().splitlines()


@pytest.mark.parametrize("metrics, what", [(CoordinatorMetrics(), "coordinator metrics"),
                                           (NodeMetrics("edge-1"), "metrics of node edge-1")])
def test_a_taken_port_is_a_one_sentence_error(metrics, what):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SpeedError) as caught:
            metrics.serve("127.0.0.1", port)
    message = str(caught.value)
    assert message.startswith(f"cannot serve {what} on 127.0.0.1:{port}: ")
    assert message.endswith("; free the port or change metrics_port in the cluster file")
    assert "\n" not in message


def test_serves_on_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    metrics = NodeMetrics("edge-1")
    metrics.set_hosting(stages=2)
    metrics.serve("::1", port)
    with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as response:
        assert "speed_node_hosting_stages 2.0" in response.read().decode().splitlines()
