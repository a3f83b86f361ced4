"""Trust on every hop, with real processes on loopback: mutual TLS between the coordinator and its nodes,
TLS and tokens (or client certificates) for clients, and nothing served in the clear off loopback."""

from __future__ import annotations

import asyncio
import json
import ssl
import stat
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from nodes.peer_links import Dialler, LinkRefused
from runtime.client import Client, Unauthenticated, Unavailable
from runtime.coordinator.ring_link import RingDialler
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import load_cluster, on_host_of
from runtime.core.errors import SpeedError
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import load_secret
from runtime.wire.security import Identity, member_channel, open_channel
from tests.conftest import CLUSTER_PROMPTS as PROMPTS
from tests.conftest import assert_one_line_error, free_port, generate_on, run_speed, running_cluster

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

SAMPLED = SamplingParams(temperature=0.8, top_k=40, seed=7)


def secured(client_auth: str = "token") -> str:
    return f"security:\n  certs: certs\n  client_auth: {client_auth}\n"


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """A three-node cluster with a security section, its certificates made by init_certs."""
    directory = tmp_path_factory.mktemp("secure")
    with running_cluster(directory, extra_top_keys=secured(), make_certs=True, extra_coordinator_keys=http_api()) as cluster:
        yield cluster


def http_api() -> str:
    return f"  http_address: 127.0.0.1:{free_port()}\n"


def openai_client(cluster, api_key: str = "unused", *, certificate: bool = False):
    """The official client for the cluster's HTTP API over TLS, trusting the cluster's authority; certificate:
    it presents the client certificate of `speed certs init`."""
    import openai

    certs = certs_of(cluster)
    context = ssl.create_default_context(cafile=certs / "ca.pem")
    if certificate:
        context.load_cert_chain(certs / "client.pem", certs / "client.key")
    return openai.OpenAI(base_url=f"https://{cluster.spec.coordinator.http_address}/v1", api_key=api_key,
                         max_retries=0, timeout=60, http_client=openai.DefaultHttpxClient(verify=context))


def certs_of(cluster) -> Path:
    return load_cluster(cluster.path).security.certs


def token_of(cluster) -> str:
    return (certs_of(cluster) / "client.token").read_text().strip()


def test_certs_init_names_every_process_and_keeps_keys_private(tmp_path):
    (tmp_path / "cluster.yaml").write_text(
        "cluster: c\ncoordinator: {address: '127.0.0.1:50090'}\nnodes:\n"
        "  - {name: edge-1, address: '127.0.0.1:50091', stages: [0]}\n  - {name: edge-2, address: 'localhost:50092', "
        "stages: [1, 2]}\n")
    result = run_speed("certs", "init", str(tmp_path / "certs"), "--cluster", str(tmp_path / "cluster.yaml"))
    assert result.returncode == 0, result.stderr
    certs = tmp_path / "certs"
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    for private in ["ca.key", "coordinator.key", "node.edge-1.key", "node.edge-2.key", "client.key", "client.token",
                    "tokens.txt"]:
        assert stat.S_IMODE((certs / private).stat().st_mode) == 0o600, private
    node = x509.load_pem_x509_certificate((certs / "node.edge-2.pem").read_bytes())
    assert node.subject.rfc4514_string() == "CN=speed node edge-2"
    names = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["edge-2", "localhost"]
    assert_one_line_error(run_speed("certs", "init", str(certs), "--cluster", str(tmp_path / "cluster.yaml")),
                          "already exists")


def test_the_secure_cluster_gives_the_reference_text(secure, reference):
    with Client(secure.endpoint, ca=certs_of(secure) / "ca.pem", token=token_of(secure)) as client:
        for sampling in (GREEDY, SAMPLED):
            assert generate_on(client, PROMPTS[0], sampling).token_ids == reference(PROMPTS[0], sampling)
        assert client.status().serving


@pytest.mark.parametrize("token", [None, "not-a-token"], ids=["no token", "wrong token"])
def test_generate_and_status_need_a_valid_token(secure, token):
    with Client(secure.endpoint, ca=certs_of(secure) / "ca.pem", token=token) as client:
        with pytest.raises(Unauthenticated, match="needs a valid bearer token"):
            client.generate("Hello", max_new_tokens=4).result()
        with pytest.raises(Unauthenticated, match="needs a valid bearer token"):
            client.status()


def test_the_http_api_speaks_tls_and_needs_a_valid_token(secure, reference):
    import openai

    with openai_client(secure, token_of(secure)) as api:
        answer = api.completions.create(model="", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert answer.model_extra["speed"]["token_ids"] == reference(PROMPTS[0], max_new_tokens=8)
    with openai_client(secure, "not-a-token") as api, pytest.raises(openai.AuthenticationError) as refused:
        api.models.list()
    assert refused.value.status_code == 401 and "needs a valid bearer token" in refused.value.message
    no_header = urllib.request.Request(f"https://{secure.spec.coordinator.http_address}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(no_header, context=ssl.create_default_context(cafile=certs_of(secure) / "ca.pem"))
    assert refused.value.code == 401
    plain = openai.OpenAI(base_url=f"http://{secure.spec.coordinator.http_address}/v1", api_key=token_of(secure),
                          max_retries=0, timeout=10)
    with plain, pytest.raises(openai.APIConnectionError):
        plain.models.list()


def test_every_path_of_the_http_api_needs_the_token_its_schema_too(secure):
    """Without a token the API tells nothing: not its schema, not which field of a body is wrong."""
    base = f"https://{secure.spec.coordinator.http_address}"
    context = ssl.create_default_context(cafile=certs_of(secure) / "ca.pem")
    json_body = {"Content-Type": "application/json"}
    for request in (urllib.request.Request(f"{base}/openapi.json"),
                    urllib.request.Request(f"{base}/v1/completions", data=b'{"max_tokens": "many"}', headers=json_body)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, context=context, timeout=30)
        assert refused.value.code == 401, request.full_url
        assert "needs a valid bearer token" in json.load(refused.value)["error"]["message"]
    with_token = urllib.request.Request(f"{base}/openapi.json", headers={"Authorization": f"Bearer {token_of(secure)}"})
    with urllib.request.urlopen(with_token, context=context, timeout=30) as answer:
        assert "/v1/chat/completions" in json.load(answer)["paths"]


def test_a_plain_client_cannot_talk_to_a_secure_coordinator(secure):
    with Client(secure.endpoint) as client, pytest.raises(Unavailable):
        client.status(timeout_s=5)


def test_tokens_are_added_and_removed_on_a_running_cluster(secure):
    cluster_file = str(secure.path)
    added = run_speed("tokens", "add", "alice", "--cluster", cluster_file)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    with Client(secure.endpoint, ca=certs_of(secure) / "ca.pem", token=token) as client:
        assert client.status().serving
        assert run_speed("tokens", "remove", "alice", "--cluster", cluster_file).returncode == 0
        with pytest.raises(Unauthenticated):
            client.status()


class Impostor(pb_grpc.NodeServicer):
    """Serves Info claiming to be a node, with whatever certificate it was given."""

    def __init__(self, real_info: pb.NodeInfo):
        self.real_info = real_info

    def Info(self, request, context):
        return self.real_info


def register_as_edge_3(cluster, address: str) -> grpc.RpcError:
    """Registry.Register as edge-3 at `address`, over TLS, by a caller that holds the cluster's secret (the
    checks behind it); the refusal it gets."""
    certs = certs_of(cluster)
    info = pb.NodeInfo(name="edge-3", stages=[2], bundle_sha256=load_bundle().sha256)
    credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with open_channel(cluster.endpoint, credentials, secret=load_secret(cluster.spec)) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.RegistryStub(channel).Register(pb.RegisterRequest(info=info, address=address), timeout=10)
    return refused.value


def test_a_registration_at_another_address_than_the_file_s_is_refused_without_dialling_it(secure):
    refusal = register_as_edge_3(secure, "10.9.9.9:50051")
    assert refusal.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "registered with address '10.9.9.9:50051' but the cluster file gives it" in refusal.details()


@pytest.mark.parametrize("certificate", ["none", "another node's"])
def test_a_process_in_a_dead_node_s_place_cannot_register_as_it(secure, certificate):
    certs = certs_of(secure)
    address = load_cluster(secure.path).node("edge-3").address
    secure.stop_process("edge-3")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_NodeServicer_to_server(Impostor(pb.NodeInfo(name="edge-3", stages=[2],
                                                            bundle_sha256=load_bundle().sha256)), server)
    if certificate == "none":
        server.add_insecure_port(address)
    else:  # edge-1's certificate, from the cluster's own authority
        pair = ((certs / "node.edge-1.key").read_bytes(), (certs / "node.edge-1.pem").read_bytes())
        server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
    server.start()
    try:
        refusal = register_as_edge_3(secure, address)
        assert refusal.code() == grpc.StatusCode.UNAVAILABLE and "could not be reached as itself" in refusal.details()
    finally:
        server.stop(0).wait()
    secure.start_process("edge-3")
    secure.wait_ready(60)
    with Client(secure.endpoint, ca=certs / "ca.pem", token=token_of(secure)) as client:
        assert generate_on(client, PROMPTS[1], max_new_tokens=8).token_ids


@pytest.mark.parametrize("certificate", ["client", "none"])
def test_a_node_serves_only_the_coordinator_s_certificate(secure, certificate):
    certs = certs_of(secure)
    node = load_cluster(secure.path).node("edge-2")
    key, cert = ((certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()) if certificate == "client" \
        else (None, None)
    credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), key, cert)
    with open_channel(node.address, credentials, server_name="edge-2", secret=load_secret(secure.spec)) as channel:
        stream = pb_grpc.NodeStub(channel).Steps(iter([pb.StepBatch(closes=list(range(1, 200)))]), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            list(stream)
    if certificate == "client":
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "serves only its cluster's coordinator, not speed client" in refused.value.details()
    else:  # no certificate: the TLS handshake itself fails
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificates_when_the_cluster_asks_for_them(tmp_path, reference):
    import openai

    with running_cluster(tmp_path, extra_top_keys=secured("certificate"), make_certs=True,
                         extra_coordinator_keys=http_api()) as cluster:
        certs = certs_of(cluster)
        with openai_client(cluster, certificate=True) as api:
            answer = api.completions.create(model="", prompt=PROMPTS[2], max_tokens=8, temperature=0)
            assert answer.model_extra["speed"]["token_ids"] == reference(PROMPTS[2], max_new_tokens=8)
        with openai_client(cluster, token_of(cluster)) as api, pytest.raises(openai.APIConnectionError):
            api.models.list()  # no certificate: the TLS handshake fails
        with Client(cluster.endpoint, ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key") as client:
            assert generate_on(client, PROMPTS[2], max_new_tokens=8).token_ids == reference(PROMPTS[2], max_new_tokens=8)
        with Client(cluster.endpoint, ca=certs / "ca.pem", token=token_of(cluster)) as client:
            with pytest.raises(Unavailable, match=r"a client certificate \(--cert, --key\) given"):
                client.status(timeout_s=5)


@pytest.mark.parametrize("process", ["coordinator", "node"])
def test_nothing_listens_off_loopback_in_the_clear(tmp_path, process):
    path = tmp_path / "cluster.yaml"
    coordinator, node = ("0.0.0.0", "127.0.0.1") if process == "coordinator" else ("127.0.0.1", "0.0.0.0")
    path.write_text(f"cluster: open\ncoordinator: {{address: '{coordinator}:{free_port()}'}}\nnodes:\n"
                    f"  - {{name: edge-1, address: '{node}:{free_port()}', stages: [0, 1, 2]}}\n")
    command = ["coordinator", "--cluster", str(path)] if process == "coordinator" else \
        ["node", "--cluster", str(path), "--name", "edge-1"]
    result = run_speed(*command, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "without TLS; add a security section" in result.stderr and "insecure: true" in result.stderr


def test_a_secure_cluster_file_without_certificates_names_the_command_that_makes_them(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"cluster: c\ncoordinator: {{address: '127.0.0.1:{free_port()}'}}\n{secured()}nodes:\n"
                    f"  - {{name: edge-1, address: '127.0.0.1:{free_port()}', stages: [0, 1, 2]}}\n")
    assert_one_line_error(run_speed("up", str(path)), "does not exist; make the cluster's certificates with "
                                                      f"`speed certs init {tmp_path / 'certs'} --cluster FILE`")



def test_in_a_plain_cluster_too_only_the_coordinator_s_connection_may_step_a_node(tmp_path, reference):
    with running_cluster(tmp_path) as cluster, Client(cluster.endpoint) as client:
        stream = client.generate(PROMPTS[3], max_new_tokens=48)
        chunks = iter(stream)
        received = list(next(chunks).token_ids)
        node = load_cluster(cluster.path).node("edge-2")
        with member_channel(cluster.spec, node.address) as channel:  # a process of the cluster, not its coordinator
            attack = pb_grpc.NodeStub(channel).Steps(iter([pb.StepBatch(closes=list(range(1, 200)))]), timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                list(attack)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        received += [token for chunk in chunks for token in chunk.token_ids]
        assert received == stream.result().token_ids == reference(PROMPTS[3], max_new_tokens=48)


def test_on_the_ring_nodes_forward_to_each_other_over_tls_and_refuse_other_callers(tmp_path, reference):
    """Node to node, each end shows its certificate; the client's certificate may not forward states."""
    with running_cluster(tmp_path, extra_top_keys=secured() + "data_path: ring\n", make_certs=True) as cluster:
        certs = certs_of(cluster)
        with Client(cluster.endpoint, ca=certs / "ca.pem", token=token_of(cluster)) as client:
            for sampling in (GREEDY, SAMPLED):
                assert generate_on(client, PROMPTS[1], sampling).token_ids == reference(PROMPTS[1], sampling)
        spec, secret = load_cluster(cluster.path), load_secret(cluster.spec)
        node = spec.node("edge-2")
        coordinator = Identity.load(spec.security, "coordinator").channel()
        with open_channel(node.address, coordinator, server_name="edge-2", secret=secret) as channel:
            port = pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10).link_port
        link_address = on_host_of(node.address, port)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.load_verify_locations(certs / "ca.pem")
        client.load_cert_chain(certs / "client.pem", certs / "client.key")
        with pytest.raises(LinkRefused) as refused:
            Dialler("edge-1", secret, client)("edge-2", link_address)
        assert "takes forwarded states only from the nodes of its placement, not speed client" in str(refused.value)
        with pytest.raises(SpeedError) as refused:  # nor drive the ring as its coordinator does
            asyncio.run(RingDialler(secret, client).open("edge-2", link_address, pb.RingBinding()))
        assert "takes the ring's control only from its cluster's coordinator, not speed client" in str(refused.value)
        with pytest.raises(LinkRefused) as refused:  # nor have its probes echoed
            Dialler("edge-1", secret, client)("edge-2", link_address, probe=True)
        assert "echoes probes only for the nodes of its cluster, not speed client" in str(refused.value)
        with open_channel(node.address, coordinator, server_name="edge-2", secret=secret) as channel:
            timed = {link.node for link in pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10).links}
        assert timed == {"edge-1", "edge-3"}  # its links timed over TLS, each with the node certificates
        without_certificate = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        without_certificate.check_hostname = False
        without_certificate.load_verify_locations(certs / "ca.pem")
        with pytest.raises(OSError):  # the handshake fails: a link must show a certificate of the cluster
            Dialler("edge-1", secret, without_certificate)("edge-2", link_address).recv(1)
