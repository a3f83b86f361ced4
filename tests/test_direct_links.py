"""Direct links, in one process over real loopback sockets: messages in order, the hello and its refusals,
frames a listener will not read, a peer that is down, TLS with node certificates, a link read and written at
once."""

from __future__ import annotations

import io
import logging
import queue
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from cryptography.hazmat.primitives import serialization

from deploy.certs import Authority, common_name
from nodes import link_listener
from nodes.link_listener import LinkListener, LinkSession
from nodes.peer_links import Dialler, LinkRefused, PeerLinks
from runtime.core.cluster_file import SecuritySpec, parse_address
from runtime.core.errors import SpeedError
from runtime.core.ring import Commit
from runtime.executor.cpu_profile import CpuProfile
from runtime.wire import speed_pb2 as pb
from runtime.wire.framed_connection import FramedConnection
from runtime.wire.frames import HANDSHAKE_BYTES, frame, read_frame
from runtime.wire.security import link_contexts
from tests.conftest import free_port

SECRET = "ab" * 32


@contextmanager
def listening(*, admit=lambda certificate: "", tls=None, max_frame_bytes=1 << 20) -> Iterator[tuple[str, queue.Queue]]:
    """A listener of node edge-2 whose messages land in the queue: (its address, the queue)."""
    taken: queue.SimpleQueue = queue.SimpleQueue()
    def open_session(hello: pb.LinkHello, certificate: str, connection) -> LinkSession | str:
        return admit(certificate) or LinkSession(take=lambda payload: taken.put(pb.Forwarded.FromString(payload)) or "")

    listener = LinkListener("127.0.0.1", owner="node edge-2", secret=SECRET, open_session=open_session,
                            max_frame_bytes=max_frame_bytes, tls=tls)
    try:
        yield f"127.0.0.1:{listener.port}", taken
    finally:
        listener.close()


def links_to(address: str, *, delay_s: float = 0.0, dial: Dialler | None = None) -> PeerLinks:
    return PeerLinks({"edge-2": address}, dial or Dialler("edge-1", SECRET), delay_s=delay_s, incarnation=3, epoch=4,
                     profile=CpuProfile())


def commits(taken: queue.SimpleQueue, count: int) -> list[int]:
    positions = []
    while len(positions) < count:
        message = taken.get(timeout=10)
        assert (message.incarnation, message.epoch) == (3, 4)
        positions += [commit.position for commit in message.commits]
    return positions


@pytest.mark.parametrize("delay_s", [0.0, 0.02], ids=["direct", "emulated-latency"])
def test_messages_arrive_whole_and_in_order(delay_s):
    with listening() as (address, taken):
        links = links_to(address, delay_s=delay_s)
        sent_at = time.monotonic()
        for position in range(200):
            links.send("edge-2", [Commit(seq_id=1, position=position, token=7), Commit(seq_id=2, position=position,
                                                                                     token=8)])
        assert commits(taken, 400) == [p for position in range(200) for p in (position, position)]
        assert time.monotonic() - sent_at >= delay_s
        links.close()


def test_a_link_without_the_cluster_secret_is_refused_with_a_sentence():
    with listening() as (address, taken):
        with pytest.raises(LinkRefused) as refused:
            Dialler("edge-1", "cd" * 32)("edge-2", address)
        assert "did not carry the cluster's secret" in str(refused.value)
        with Dialler("edge-1", SECRET)("edge-2", address) as link:  # the listener still takes the cluster's links
            link.sendall(frame(pb.Forwarded(epoch=4).SerializeToString()))
            assert taken.get(timeout=10).epoch == 4


def test_a_link_the_node_does_not_admit_is_refused_with_its_sentence():
    with listening(admit=lambda certificate: "node edge-2 takes no links today") as (address, _):
        with pytest.raises(LinkRefused, match="node edge-2 takes no links today"):
            Dialler("edge-1", SECRET)("edge-2", address)


def test_a_frame_larger_than_the_listener_takes_ends_its_link_unread():
    with listening(max_frame_bytes=1000) as (address, taken), Dialler("edge-1", SECRET)("edge-2", address) as link:
        link.sendall(frame(b"x" * 5000))
        with link.makefile("rb") as answers:
            refusal = pb.LinkAnswer.FromString(read_frame(answers, HANDSHAKE_BYTES)).refusal
            assert read_frame(answers, HANDSHAKE_BYTES) is None
        assert refusal == "a frame of 5000 bytes is more than the 1000 a link takes"
        assert taken.empty()


def test_connections_beyond_the_most_a_node_serves_are_closed_and_later_links_still_taken(monkeypatch):
    monkeypatch.setattr(link_listener, "MAX_OPEN_LINKS", 2)
    with listening() as (address, taken):
        host, port = parse_address(address)
        silent = [socket.create_connection((host, port)) for _ in range(2)]  # say no hello: each holds a thread
        time.sleep(0.2)
        with socket.create_connection((host, port), timeout=10) as crowded:
            assert crowded.recv(1) == b""  # closed at once
        for connection in silent:
            connection.close()
        time.sleep(0.2)
        links = links_to(address)
        links.send("edge-2", [Commit(seq_id=1, position=0, token=7)])
        assert commits(taken, 1) == [0]
        links.close()


def test_a_port_the_cluster_file_gives_another_process_is_not_taken_for_links(monkeypatch):
    """Any free port, but not one another process of the cluster is about to listen on."""
    reserved = free_port()
    made = []

    def create_server(address, **options):  # the system's first choice: the reserved port
        made.append(real_create_server((address[0], reserved if not made else address[1]), **options))
        return made[-1]

    real_create_server = socket.create_server
    monkeypatch.setattr(link_listener.socket, "create_server", create_server)
    listener = LinkListener("127.0.0.1", owner="node edge-2", secret=SECRET,
                            open_session=lambda *link: LinkSession(take=lambda payload: ""), max_frame_bytes=1000,
                            avoid=frozenset({reserved}))
    try:
        assert listener.port != reserved and len(made) == 2
        assert made[0].fileno() == -1  # the reserved port was given back
    finally:
        listener.close()


def test_frames_cut_short_are_errors_and_an_ended_stream_is_none():
    assert read_frame(io.BytesIO(b""), 10) is None
    assert read_frame(io.BytesIO(frame(b"abc")), 10) == b"abc"
    for cut in (frame(b"abc")[:2], frame(b"abc")[:5]):
        with pytest.raises(SpeedError, match="the link closed inside a frame"):
            read_frame(io.BytesIO(cut), 10)


def test_sending_to_a_node_that_is_down_loses_the_messages_and_says_so_once(caplog):
    address = f"127.0.0.1:{free_port()}"
    links = links_to(address)
    with caplog.at_level(logging.WARNING, logger="speed.node"):
        for position in range(20):  # never raises, never blocks the stage worker
            links.send("edge-2", [Commit(seq_id=1, position=position, token=7)])
        deadline = time.monotonic() + 10
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.01)
        for position in range(20):
            links.send("edge-2", [Commit(seq_id=1, position=position, token=7)])
    links.close()
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"cannot open a link to node edge-2 at {address}"), said
    assert "link_port" in said[0]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    authority = Authority("links", days=1)
    (directory / "ca.pem").write_bytes(authority.cert.public_bytes(serialization.Encoding.PEM))
    for name in ("edge-1", "edge-2"):
        authority.issue(directory, f"node.{name}", common_name("node", name), [name, "127.0.0.1"])
    return SecuritySpec(certs=directory)


def test_over_tls_each_end_shows_its_node_certificate(certs):
    seen = []
    server, _ = link_contexts(certs, "node.edge-2")
    _, client = link_contexts(certs, "node.edge-1")
    with listening(tls=server, admit=lambda certificate: seen.append(certificate) or "") as (address, taken):
        links = links_to(address, dial=Dialler("edge-1", SECRET, client))
        links.send("edge-2", [Commit(seq_id=1, position=0, token=7)])
        assert commits(taken, 1) == [0]
        assert seen == [common_name("node", "edge-1")]
        with pytest.raises(LinkRefused, match="shows the certificate of 'speed node edge-2', not node edge-3's"):
            Dialler("edge-1", SECRET, client)("edge-3", address)
        links.close()


def test_over_tls_a_link_is_read_and_written_at_once_without_a_frame_torn(certs):
    """The coordinator's link to a node: the node's link thread reads while other threads write (OpenSSL takes
    one call on a connection at a time); every frame arrives whole both ways."""
    server_context, _ = link_contexts(certs, "node.edge-2")
    _, client_context = link_contexts(certs, "node.edge-1")
    server, dialled = socket.socket(), socket.socket()
    for end in (server, dialled):  # small buffers (before connecting): writes wait for the reader, TLS repeats them
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        dialled.connect(server.getsockname())
        accepted, _ = server.accept()
    with ThreadPoolExecutor(2) as pool:
        handshakes = pool.submit(server_context.wrap_socket, accepted, server_side=True), \
            pool.submit(client_context.wrap_socket, dialled)
        node_end, other_end = (done.result(timeout=10) for done in handshakes)
    node = FramedConnection(node_end, send_timeout_s=10)
    other = FramedConnection(other_end, send_timeout_s=10)
    sizes = [1, 40, 5_000, 70_000, 300]

    def write(connection: FramedConnection, tag: int) -> None:
        for size in sizes * 20:
            connection.send(frame(bytes([tag]) * size))

    def read(connection: FramedConnection, count: int) -> list[bytes]:
        return [connection.read_frame(1 << 20, timeout_s=30) for _ in range(count)]

    with ThreadPoolExecutor(5) as pool:
        from_node = pool.submit(read, other, 2 * len(sizes) * 20)
        to_node = pool.submit(read, node, len(sizes) * 20)
        for done in [pool.submit(write, node, 1), pool.submit(write, node, 2), pool.submit(write, other, 3)]:
            done.result(timeout=60)
        received, taken = from_node.result(timeout=60), to_node.result(timeout=60)
    assert all(len(set(payload)) == 1 for payload in received + taken)  # no frame holds another's bytes
    assert sorted(len(payload) for payload in received) == sorted(sizes * 40)
    assert [len(payload) for payload in taken] == sizes * 20 and {payload[0] for payload in taken} == {3}
    node.end()
    assert other.read_frame(1 << 20, timeout_s=10) is None  # the other end sees the link's end
    node_end.close()
    other_end.close()
