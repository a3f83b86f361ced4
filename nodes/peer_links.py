"""A node's outgoing links to the other nodes of the ring: one Forward stream per peer, opened on first
use and written by a thread of its own from a line of messages (a delay line only where a slow link is
EMULATED).

A broken link logs once and is opened again by the first message after RETRY_S; what was in flight on
it, and what is sent meanwhile, is lost, which the coordinator notices as a sequence that stops
committing and replays."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from nodes.delay_line import line
from runtime.executor.cpu_profile import CpuProfile
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.ring import forwarded

log = logging.getLogger("speed.node")
RETRY_S = 1.0  # a broken link is not dialled again sooner: a peer that is down would cost a dial per message


class PeerLink:
    def __init__(self, peer: str, channel: grpc.Channel, *, delay_s: float, incarnation: int, epoch: int,
                 profile: CpuProfile):
        self.peer = peer
        self._profile = profile
        self.broken_at: float | None = None
        self._channel = channel
        self._line = line(delay_s)
        self._stamp = dict(incarnation=incarnation, epoch=epoch)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"link-to-{peer}")
        self._thread.start()

    def send(self, message) -> None:
        self._line.put(message)

    def close(self) -> None:
        self._line.close()

    def _run(self) -> None:
        stub = pb_grpc.NodeStub(self._channel)
        try:
            stub.Forward(self._messages())
        except grpc.RpcError as exc:
            log.warning("the link to node %s broke (%s); it is opened again for the next message", self.peer,
                        exc.code().name if hasattr(exc, "code") else exc)
        finally:
            self.broken_at = time.monotonic()
            self._channel.close()

    def _messages(self):
        for batch in self._line.batches():
            with self._profile.timed("serialize"):
                message = forwarded(batch, **self._stamp)
            yield message


class PeerLinks:
    def __init__(self, addresses: dict[str, str], open_channel: Callable[[str, str], grpc.Channel], *, delay_s: float,
                 incarnation: int, epoch: int, profile: CpuProfile):
        """addresses: node name -> address of every other node of the placement; open_channel(name, address)."""
        self._addresses = addresses
        self._open_channel = open_channel
        self._delay_s = delay_s
        self._incarnation, self._epoch = incarnation, epoch
        self._profile = profile
        self._links: dict[str, PeerLink] = {}

    def send(self, peer: str, message) -> None:
        link = self._links.get(peer)
        if link is not None and link.broken_at is not None and time.monotonic() - link.broken_at < RETRY_S:
            return
        if link is None or link.broken_at is not None:
            link = self._links[peer] = PeerLink(peer, self._open_channel(peer, self._addresses[peer]), delay_s=self._delay_s,
                                                incarnation=self._incarnation, epoch=self._epoch, profile=self._profile)
        link.send(message)

    def close(self) -> None:
        for link in self._links.values():
            link.close()
