"""Only the processes a cluster started can steer it: every call of its own services (Node, Registry)
needs the cluster's secret, plain or TLS; a node takes its stages only from the coordinator it registered
with; heartbeats carry only values a node can report. Clients are not asked for the secret."""

from __future__ import annotations

import os
import stat
import time

import grpc
import pytest
from google.protobuf.message_factory import GetMessageClass

from deploy.launcher import LocalCluster
from runtime.client import Client
from runtime.core.cluster_file import load_cluster
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import load_secret, secret_path
from runtime.wire.enums import node_state_of
from runtime.wire.security import member_channel, open_channel
from tests.conftest import CLUSTER_PROMPTS as PROMPTS
from tests.conftest import assert_one_line_error, generate_on, run_speed, running_cluster, write_cluster

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback


def every_call(channel: grpc.Channel, service: str) -> dict[str, grpc.StatusCode]:
    """Each method of the service called once with an empty request: the status it ends with."""
    codes = {}
    for method in pb.DESCRIPTOR.services_by_name[service].methods:
        request_type, reply_type = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        make = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary, (True, True): channel.stream_stream}
        call = make[method.client_streaming, method.server_streaming](
            f"/{method.full_name.rsplit('.', 1)[0]}/{method.name}", request_serializer=request_type.SerializeToString,
            response_deserializer=reply_type.FromString)
        try:
            answer = call(iter([request_type()]) if method.client_streaming else request_type(), timeout=10)
            if method.server_streaming:
                list(answer)
            codes[method.name] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            codes[method.name] = exc.code()
    return codes


def all_refused(codes: dict[str, grpc.StatusCode]) -> bool:
    return set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}


def serving_its_own(client: Client) -> bool:
    return all(node_state_of(n) == "serving" and list(n.hosting) == list(n.stages) for n in client.status().nodes)


def test_a_plain_cluster_refuses_every_call_of_its_own_services_from_a_process_it_did_not_start(tmp_path, state_dir,
                                                                                                reference):
    # the secret `speed up` makes in the state directory
    with running_cluster(tmp_path, secret_file=False) as cluster, Client(cluster.endpoint) as client:
        spec = cluster.spec
        with open_channel(spec.coordinator.address) as channel:
            assert all_refused(every_call(channel, "Registry"))
        for node in spec.nodes:
            with open_channel(node.address) as channel:
                assert all_refused(every_call(channel, "Node")), node.name
                with pytest.raises(grpc.RpcError) as refusal:  # to evict it: a newer incarnation than the live one
                    pb_grpc.NodeStub(channel).Assign(pb.AssignRequest(incarnation=2**62, stages=[1]), timeout=10)
                assert refusal.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "answers only the processes of its cluster" in refusal.value.details()
        time.sleep(2 * spec.coordinator.heartbeat_interval_s)
        assert serving_its_own(client)
        assert generate_on(client, PROMPTS[0]).token_ids == reference(PROMPTS[0])


def test_holding_the_secret_is_not_enough_to_assign_a_node_or_forge_its_heartbeat(tmp_path, reference):
    """A process with the secret (another node of the cluster, say) is still not its coordinator."""
    with running_cluster(tmp_path) as cluster, Client(cluster.endpoint) as client:
        spec = cluster.spec
        edge_2 = spec.node("edge-2")
        with member_channel(spec, edge_2.address) as channel, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.NodeStub(channel).Assign(pb.AssignRequest(incarnation=2**62, stages=[1]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "takes its stages only from the coordinator it registered with" in refused.value.details()
        with member_channel(spec, spec.coordinator.address) as channel:
            registry = pb_grpc.RegistryStub(channel)
            for forged, problem in [(dict(open_sequences=-5), "open_sequences must be 0 to 8"),
                                    (dict(step_ms=float("nan")), "step_ms must be 0 to"),
                                    (dict(positions_per_s=-1e308), "positions_per_s must be 0 to"),
                                    (dict(memory_available_bytes=2**63), "memory_available_bytes must be 0 to"),
                                    (dict(links=[pb.LinkTime(node="edge-2", rtt_ms=1)]), "links must name other nodes"),
                                    (dict(links=[pb.LinkTime(node="edge-1", rtt_ms=-1)]), "links' rtt_ms must be")]:
                with pytest.raises(grpc.RpcError) as refused:
                    registry.Heartbeat(pb.HeartbeatRequest(name="edge-2", **forged), timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert f"a heartbeat of node edge-2: {problem}" in refused.value.details()
        shown = {n.name: n for n in client.status().nodes}["edge-2"]
        assert 0 <= shown.sequences <= shown.max_sequences and shown.step_ms == shown.step_ms >= 0
        assert serving_its_own(client)
        assert generate_on(client, PROMPTS[1]).token_ids == reference(PROMPTS[1])


def test_a_secure_cluster_asks_for_the_secret_behind_its_certificates(tmp_path):
    security = "security:\n  certs: certs\n  client_auth: token\n"
    with running_cluster(tmp_path, extra_top_keys=security, make_certs=True) as cluster:
        certs = cluster.spec.security.certs
        ca = (certs / "ca.pem").read_bytes()
        with open_channel(cluster.endpoint, grpc.ssl_channel_credentials(ca)) as channel:
            assert all_refused(every_call(channel, "Registry"))
        with_client_certificate = grpc.ssl_channel_credentials(ca, (certs / "client.key").read_bytes(),
                                                               (certs / "client.pem").read_bytes())
        node = cluster.spec.node("edge-1")
        with open_channel(node.address, with_client_certificate, server_name="edge-1") as channel:
            assert all_refused(every_call(channel, "Node"))
        with Client(cluster.endpoint, ca=certs / "ca.pem", token=(certs / "client.token").read_text().strip()) as client:
            assert serving_its_own(client)


def test_the_secret_is_private_new_at_each_start_and_in_no_command_line_or_environment(tmp_path, state_dir):
    path = write_cluster(tmp_path, secret_file=False)
    secrets = []
    for _ in range(2):
        with LocalCluster(path) as cluster:
            secret = load_secret(cluster.spec)
            secrets.append(secret)
            assert stat.S_IMODE(secret_path(cluster.spec).stat().st_mode) == 0o600
            for name, process in cluster.processes.items():
                for view in ("cmdline", "environ"):
                    assert secret.encode() not in open(f"/proc/{process.pid}/{view}", "rb").read(), (name, view)
    assert secrets[0] != secrets[1]


def test_a_secret_file_that_is_missing_or_readable_by_others_is_named_before_anything_starts(tmp_path, state_dir):
    path = write_cluster(tmp_path)
    shared = tmp_path / "cluster.secret"
    os.chmod(shared, 0o644)
    assert_one_line_error(run_speed("up", str(path)), f"the cluster secret {shared} can be read by others than its "
                                                     f"owner; chmod 600 {shared}")
    shared.unlink()
    assert_one_line_error(run_speed("node", "--cluster", str(path), "--name", "edge-1"),
                          f"secret_file {shared} does not exist; make it with `speed certs secret {shared}`")
    made = run_speed("certs", "secret", str(shared))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(shared.stat().st_mode) == 0o600 and len(load_secret(load_cluster(path))) == 64
    assert_one_line_error(run_speed("certs", "secret", str(shared)), "already exists; pass --force")
