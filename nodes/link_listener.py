"""Where a node takes its direct links (proto/speed/v1/speed.proto, "Direct links"): a listening socket, and
a thread for each link that reads its frames and hands each message to the node, so that what one peer sends
never waits behind another's. Two kinds of link come here: the other nodes' of its ring, which bring
forwarded states, and the coordinator's, which brings the ring's control and takes the node's events.

A link is answered before any of its messages is read: refused with a sentence without the cluster's secret,
or when the node does not take it (`open_session`: in a secure cluster, a certificate it does not take; a
coordinator's link for a placement it does not serve). A message the node refuses ends its link the same way;
the node keeps serving, and what the link carried is lost, which the coordinator notices as a sequence that
stops committing, or a lost node, and replays."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from runtime.core.errors import SpeedError
from runtime.wire import speed_pb2 as pb
from runtime.wire.cluster_secret import refusal_without
from runtime.wire.framed_connection import FramedConnection
from runtime.wire.frames import HANDSHAKE_BYTES, frame
from runtime.wire.security import certificate_name

log = logging.getLogger("speed.node")
HELLO_TIMEOUT_S = 10.0  # a connection that does not say who it is within this long is closed
MAX_OPEN_LINKS = 128  # links a node serves at once, said hello or not: a thread each
RETRY_ACCEPT_S = 0.1
LINGER_S = 2.0  # how long a refused link is read to its end, at most
SEND_TIMEOUT_S = 10.0  # a peer that takes nothing for this long (its machine gone) breaks the link


def answer(refusal: str) -> bytes:
    """A LinkAnswer frame: the answer to a hello, and to a node's message that ends its link."""
    return frame(pb.LinkAnswer(refusal=refusal).SerializeToString())


@dataclass(frozen=True)
class LinkSession:
    """What the node does with a link it took: take(frame) gives "" or the sentence refusing the message, which
    ends the link after `refusal(sentence)` (the frame saying so, in what the peer reads); ended() runs once the
    link is over, whoever ended it."""

    take: Callable[[bytes], str]
    ended: Callable[[], None] = lambda: None
    refusal: Callable[[str], bytes] = answer


# open_session(hello, the certificate's name, the connection): a session for the link, or the sentence refusing it
OpenSession = Callable[[pb.LinkHello, str, FramedConnection], "LinkSession | str"]


class LinkListener:
    def __init__(self, host: str, *, owner: str, secret: str, open_session: OpenSession, max_frame_bytes: int,
                 tls: ssl.SSLContext | None = None, port: int = 0, avoid: frozenset[int] = frozenset()):
        """owner: who refuses, in sentences ("node edge-1"); open_session: what the node makes of a link whose hello
        carried the secret (it may write its own frames to the connection once it is answered); port 0: any free
        port (`port` says which) but those in `avoid` (the ports the cluster's other processes are to listen on,
        which may not have started yet)."""
        self._owner, self._secret = owner, secret
        self._open_session = open_session
        self._max_frame_bytes = max_frame_bytes
        self._tls = tls
        try:
            self._server = _listen(host, port, avoid)
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
            framed = FramedConnection(link, send_timeout_s=SEND_TIMEOUT_S)
            hello = pb.LinkHello.FromString(framed.read_frame(HANDSHAKE_BYTES, timeout_s=HELLO_TIMEOUT_S) or b"")
            who = f"node {hello.node}" if hello.node else "the coordinator" if hello.HasField("ring") else "a process"
            session = refusal_without(hello.secret, self._secret, self._owner) \
                or self._open_session(hello, certificate_name(link) if self._tls else "", framed)
            if isinstance(session, str):
                log.warning("refused a link from %s (%s): %s", who, peer, session)
                _refuse(framed, answer(session))
                return
            try:
                framed.send(answer(""))
                refusal = self._take_messages(framed, session)
                if refusal:
                    log.warning("ended the link from %s: %s", who, refusal)
                    _refuse(framed, session.refusal(refusal))
            finally:
                session.ended()
        except (OSError, DecodeError, SpeedError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            if not self._closed:
                log.info("a link from %s ended: %s", peer, exc)
        finally:
            with self._lock:
                self._open.discard(connection)
            connection.close()

    def _take_messages(self, framed: FramedConnection, session: LinkSession) -> str:
        """Every message of a link to the node, until it ends ("") or one is refused (why)."""
        while True:
            try:
                payload = framed.read_frame(self._max_frame_bytes)
            except SpeedError as exc:  # too large to read, or cut short
                return str(exc)
            if payload is None:
                return ""
            refusal = session.take(payload)
            if refusal:
                return refusal


def _listen(host: str, port: int, avoid: frozenset[int]) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    taken = []  # held while another is tried, so that the system does not give the same port again
    try:
        while True:
            server = socket.create_server((host, port), family=family)
            if port or server.getsockname()[1] not in avoid:
                return server
            taken.append(server)
    finally:
        for server in taken:
            server.close()


def _refuse(framed: FramedConnection, refusal: bytes) -> None:
    """Send the refusal's frame, then read what the peer still sends until it stops, so that closing does not
    reset the connection and lose the refusal with what the peer had sent unread."""
    framed.send(refusal)
    framed.linger(LINGER_S)


def _end(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)  # wakes its reader
    except OSError:
        pass
