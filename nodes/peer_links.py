"""A node's outgoing direct links to the other nodes of its ring (proto/speed/v1/speed.proto, "Direct links"):
one TCP connection per peer (TLS in a secure cluster), dialled on first use by a thread of its own. Once it
is open, the stage worker writes each batch of messages to it itself: no thread stands between a stage pass
and the socket. Only where a link latency is EMULATED does a delay line, and its thread, sit in the path.

A broken or refused link logs once and is dialled again by the first message after RETRY_S; what was in
flight on it, and what is sent meanwhile, is lost, which the coordinator notices as a sequence that stops
committing and replays."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

from nodes.delay_line import DelayLine
from runtime.core.cluster_file import parse_address
from runtime.core.errors import SpeedError
from runtime.executor.cpu_profile import CpuProfile
from runtime.wire import speed_pb2 as pb
from runtime.wire.frames import HANDSHAKE_BYTES, frame, read_frame
from runtime.wire.ring import forwarded
from runtime.wire.security import certificate_name, node_common_name

log = logging.getLogger("speed.node")
RETRY_S = 1.0  # a broken link is not dialled again sooner: a peer that is down would cost a dial per message
CONNECT_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0  # a peer that takes nothing for this long (its machine gone) breaks the link


class LinkRefused(SpeedError):
    """The peer answered the link's hello with a refusal, or is not the node it should be."""


class Dialler:
    """Opens node `name`'s links: TCP, TLS with its node certificate in a secure cluster, the hello answered."""

    def __init__(self, name: str, secret: str, tls: ssl.SSLContext | None = None):
        self._hellos = {probe: frame(pb.LinkHello(secret=secret, node=name, probe=probe).SerializeToString())
                        for probe in (False, True)}
        self._tls = tls

    def __call__(self, peer: str, address: str, *, probe: bool = False) -> socket.socket:
        """probe: a link whose frames the peer echoes, to time it (nodes/link_probe.py)."""
        host, port = parse_address(address)
        connection = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a hop is small and urgent
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._tls is not None:
                connection = self._tls.wrap_socket(connection)
                shown = certificate_name(connection)
                if shown != node_common_name(peer):
                    raise LinkRefused(f"{address} shows the certificate of {shown!r}, not node {peer}'s")
            connection.sendall(self._hellos[probe])
            with connection.makefile("rb") as answers:
                answer = pb.LinkAnswer.FromString(read_frame(answers, HANDSHAKE_BYTES) or b"")
            if answer.refusal:
                raise LinkRefused(answer.refusal)
            connection.settimeout(SEND_TIMEOUT_S)
            return connection
        except BaseException:
            connection.close()
            raise


class PeerLink:
    def __init__(self, peer: str, address: str, dial: Dialler, *, delay_s: float, incarnation: int, epoch: int,
                 profile: CpuProfile):
        self.peer = peer
        self.broken_at: float | None = None
        self._profile = profile
        self._stamp = dict(incarnation=incarnation, epoch=epoch)
        self._lock = threading.Lock()  # the connection, between the stage worker and the dialling thread
        self._connection: socket.socket | None = None
        self._waiting: list[bytes] = []  # frames sent while it is dialled
        self._closed = False
        self._line = DelayLine(delay_s) if delay_s > 0 else None  # EMULATION only
        threading.Thread(target=self._run, args=(dial, address), daemon=True, name=f"link-to-{peer}").start()

    def send(self, messages: list) -> None:
        with self._profile.timed("serialize"):
            data = frame(forwarded(messages, **self._stamp).SerializeToString())
        if self._line is not None:
            self._line.put(data)
            return
        with self._lock:
            if self._connection is None:
                self._waiting.append(data)
            else:
                self._write(data)

    def close(self) -> None:
        """Send nothing more: with a delay line, once what is in it has arrived."""
        if self._line is not None:
            self._line.close()
            return
        with self._lock:
            self._end()

    def _run(self, dial: Dialler, address: str) -> None:
        try:
            connection = dial(self.peer, address)
        except LinkRefused as exc:
            log.warning("node %s refused a link: %s", self.peer, exc)
            self._failed()
            return
        except OSError as exc:
            log.warning("cannot open a link to node %s at %s (%s); it is dialled again for the next message. Where a "
                        "firewall stands between the nodes, let that port through, or fix it with link_port in the "
                        "cluster file", self.peer, address, str(exc) or type(exc).__name__)
            self._failed()
            return
        with self._lock:
            self._connection = connection
            if self._closed:
                self._end()
                return
            if self._waiting:
                self._write(b"".join(self._waiting))
                self._waiting = []
        if self._line is not None:
            for batch in self._line.batches():
                with self._lock:
                    if self._connection is None:
                        return
                    self._write(b"".join(batch))
            with self._lock:
                self._end()

    def _failed(self) -> None:
        with self._lock:
            self.broken_at = time.monotonic()
            self._end()

    def _write(self, data: bytes) -> None:
        """With the lock held."""
        try:
            self._connection.sendall(data)
        except OSError as exc:
            self._broke(exc)

    def _broke(self, exc: OSError) -> None:
        """With the lock held."""
        if self.broken_at is None and not self._closed:
            log.warning("the link to node %s broke (%s); it is dialled again for the next message", self.peer,
                        str(exc) or type(exc).__name__)
        self.broken_at = time.monotonic()
        self._end()

    def _end(self) -> None:
        """With the lock held."""
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class PeerLinks:
    def __init__(self, addresses: dict[str, str], dial: Dialler, *, delay_s: float, incarnation: int, epoch: int,
                 profile: CpuProfile):
        """addresses: node name -> the address of its direct links, for every other node of the placement."""
        self._addresses = addresses
        self._dial = dial
        self._delay_s = delay_s
        self._incarnation, self._epoch = incarnation, epoch
        self._profile = profile
        self._links: dict[str, PeerLink] = {}

    def send(self, peer: str, messages: list) -> None:
        link = self._links.get(peer)
        if link is not None and link.broken_at is not None and time.monotonic() - link.broken_at < RETRY_S:
            return
        if link is None or link.broken_at is not None:
            link = self._links[peer] = PeerLink(peer, self._addresses[peer], self._dial, delay_s=self._delay_s,
                                                incarnation=self._incarnation, epoch=self._epoch, profile=self._profile)
        link.send(messages)

    def close(self) -> None:
        for link in self._links.values():
            link.close()
