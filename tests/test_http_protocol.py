"""The HTTP API's connections, on real sockets: a request's headers have HEADER_TIMEOUT_S to arrive, so
clients that send them a byte at a time (a slowloris) cannot hold sockets forever, and others are served
meanwhile. The coordinator runs in this process (no node: the API's /v1/models needs none), so the deadline
can be shortened for the test."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
import urllib.request

import pytest

from runtime.coordinator import http_protocol
from runtime.coordinator.coordinator import Coordinator
from runtime.coordinator.openai_api import http_server
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import load_cluster, parse_address
from tests.conftest import free_port, write_cluster

DEADLINE_S = 1.0
SLOW_CLIENTS = 5
DRIP_S = 0.25  # a slow client sends a byte this often, never finishing its request line


@pytest.fixture
def api_address(tmp_path, monkeypatch):
    """The HTTP API of a coordinator in this process, its header deadline DEADLINE_S, served in a thread."""
    monkeypatch.setattr(http_protocol, "HEADER_TIMEOUT_S", DEADLINE_S)
    spec = load_cluster(write_cluster(tmp_path, extra_coordinator_keys=f"  http_address: 127.0.0.1:{free_port()}\n"))
    server, listener = http_server(Coordinator(spec, load_bundle()))
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[listener]),))
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the HTTP server stopped while starting"
            time.sleep(0.05)
        yield parse_address(spec.coordinator.http_address)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def closed_by_server(connection: socket.socket) -> bool:
    """Whether the server has closed the connection; if not, one more byte of its request line goes out."""
    try:
        if select.select([connection], [], [], 0)[0]:
            return connection.recv(1024) == b""  # the server answers nothing before the headers: only its EOF
        connection.sendall(b"v")
        return False
    except OSError:  # reset: closed too
        return True


def test_connections_slow_to_send_their_headers_are_closed_while_others_are_served(api_address):
    slow = [socket.create_connection(api_address) for _ in range(SLOW_CLIENTS)]
    opened = time.monotonic()
    closed_after: dict[int, float] = {}
    try:
        for connection in slow:
            connection.sendall(b"GET /v1/mo")
        with urllib.request.urlopen(f"http://{api_address[0]}:{api_address[1]}/v1/models", timeout=10) as answer:
            assert answer.status == 200 and json.load(answer)["data"]
        while len(closed_after) < SLOW_CLIENTS and time.monotonic() - opened < 3 * DEADLINE_S:
            time.sleep(DRIP_S)
            for index, connection in enumerate(slow):
                if index not in closed_after and closed_by_server(connection):
                    closed_after[index] = time.monotonic() - opened
        assert len(closed_after) == SLOW_CLIENTS, f"open after {3 * DEADLINE_S} s: {SLOW_CLIENTS - len(closed_after)}"
        assert min(closed_after.values()) >= DEADLINE_S - DRIP_S, closed_after  # not before their time
    finally:
        for connection in slow:
            connection.close()
