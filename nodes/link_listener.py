"""Where a node takes the direct links of the other nodes of its ring (proto/speed/v1/speed.proto, "Direct
links"): a listening socket, and a thread for each link that reads its frames and hands each message to the
node, so that what one peer sends never waits behind another's.

A link is answered before any of its messages is read: refused with a sentence without the cluster's secret,
or, in a secure cluster, from a certificate the node does not take (`admit`). A message the node refuses
(`take`) ends its link the same way; the node keeps serving, and what the link carried is lost, which the
coordinator notices as a sequence that stops committing and replays."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError

from runtime.core.errors import SpeedError
from runtime.wire import speed_pb2 as pb
from runtime.wire.cluster_secret import refusal_without
from runtime.wire.frames import HANDSHAKE_BYTES, frame, read_frame
from runtime.wire.security import certificate_name

log = logging.getLogger("speed.node")
HELLO_TIMEOUT_S = 10.0  # a connection that does not say who it is within this long is closed
MAX_OPEN_LINKS = 128  # links a node serves at once, said hello or not: a thread each
RETRY_ACCEPT_S = 0.1


class LinkListener:
    def __init__(self, host: str, *, owner: str, secret: str, admit: Callable[[str], str], take: Callable[[bytes], str],
                 max_frame_bytes: int, tls: ssl.SSLContext | None = None, port: int = 0):
        """owner: who refuses, in sentences ("node edge-1"); admit(certificate name) and take(frame): "" or the
        sentence refusing the link or the message; port 0: any free port (`port` says which)."""
        self._owner, self._secret = owner, secret
        self._admit, self._take = admit, take
        self._max_frame_bytes = max_frame_bytes
        self._tls = tls
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        try:
            self._server = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise SpeedError(f"{owner} cannot listen for links on {host} port {port} ({exc.strerror}); free the port "
                             "or choose another") from None
        self.port: int = self._server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="links-in").start()

    def close(self) -> None:
        """Take no more links and end the open ones."""
        with self._lock:
            self._closed = True
            open_links = list(self._open)
        self._server.close()
        for connection in open_links:
            _end(connection)

    def _accept(self) -> None:
        while True:
            try:
                connection, peer = self._server.accept()
            except OSError as exc:
                if self._closed:
                    return
                log.warning("%s could not take a link: %s", self._owner, exc)  # e.g. out of file descriptors
                time.sleep(RETRY_ACCEPT_S)
                continue
            with self._lock:
                if self._closed:
                    _end(connection)
                    return
                crowded = len(self._open) >= MAX_OPEN_LINKS
                if not crowded:
                    self._open.add(connection)
            if crowded:  # a ring needs a link from each other node: this many are not its nodes
                log.warning("%s refused a link from %s: %d links are open already", self._owner, peer[0],
                            MAX_OPEN_LINKS)
                connection.close()
                continue
            threading.Thread(target=self._serve, args=(connection, peer[0]), daemon=True, name="link-in").start()

    def _serve(self, connection: socket.socket, peer: str) -> None:
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            connection.settimeout(HELLO_TIMEOUT_S)
            link = self._tls.wrap_socket(connection, server_side=True) if self._tls else connection
            with self._lock:  # the wrapped socket owns the connection now: close() must end that one
                self._open.discard(connection)
                self._open.add(link)
            connection = link
            with link, link.makefile("rb") as stream:
                hello = pb.LinkHello.FromString(read_frame(stream, HANDSHAKE_BYTES) or b"")
                refusal = refusal_without(hello.secret, self._secret, self._owner) \
                    or self._admit(certificate_name(link) if self._tls else "")
                _answer(link, refusal)
                if refusal:
                    log.warning("refused a link from %s (%s): %s", hello.node or "a process", peer, refusal)
                    return
                link.settimeout(None)  # a link may be idle for as long as its ring is
                refusal = self._take_messages(stream)
                if refusal:
                    _answer(link, refusal)
                    log.warning("ended the link from node %s: %s", hello.node, refusal)
        except (OSError, ssl.SSLError, DecodeError, SpeedError) as exc:
            if not self._closed:
                log.info("a link from %s ended: %s", peer, exc)
        finally:
            with self._lock:
                self._open.discard(connection)
            connection.close()

    def _take_messages(self, stream) -> str:
        """Every message of a link to the node, until it ends ("") or one is refused (why)."""
        while True:
            try:
                payload = read_frame(stream, self._max_frame_bytes)
            except SpeedError as exc:  # too large to read, or cut short
                return str(exc)
            if payload is None:
                return ""
            refusal = self._take(payload)
            if refusal:
                return refusal


def _answer(link: socket.socket, refusal: str) -> None:
    link.sendall(frame(pb.LinkAnswer(refusal=refusal).SerializeToString()))


def _end(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)  # wakes its reader
    except OSError:
        pass
