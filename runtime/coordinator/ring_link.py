"""The coordinator's direct link to a node for one placement (proto/speed/v1/speed.proto, "Direct links"):
it writes the ring's control (sequences opened and closed) and reads the node's events (committed tokens,
counts, failures). One TCP connection on the node's link port, TLS with the coordinator's certificate in a
secure cluster; the link's end is the node's loss, as a stream's end was."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

from google.protobuf.message import DecodeError

from runtime.core.cluster_file import parse_address
from runtime.core.errors import SpeedError
from runtime.wire import speed_pb2 as pb
from runtime.wire.frames import CUT_SHORT, HANDSHAKE_BYTES, LENGTH, frame, frame_length
from runtime.wire.security import certificate_name, node_common_name

CONNECT_TIMEOUT_S = 5.0
MAX_EVENTS_BYTES = 16 << 20  # a node's events frame: commits, counts and sentences of at most a few hundred sequences


class RingDialler:
    """Opens the coordinator's ring links: with the cluster's secret, and in a secure cluster TLS with the
    coordinator's certificate (tls: a client context that verifies the cluster's authority)."""

    def __init__(self, secret: str, tls: ssl.SSLContext | None = None):
        self._secret = secret
        self._tls = tls

    async def open(self, node: str, address: str, binding: pb.RingBinding) -> RingLink:
        host, port = parse_address(address)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=self._tls), CONNECT_TIMEOUT_S)
        link = RingLink(reader, writer)
        try:
            if self._tls is not None:
                shown = certificate_name(writer.get_extra_info("ssl_object"))
                if shown != node_common_name(node):
                    raise SpeedError(f"{address} shows the certificate of {shown!r}, not node {node}'s")
            writer.write(frame(pb.LinkHello(secret=self._secret, ring=binding).SerializeToString()))
            try:
                answer = pb.LinkAnswer.FromString(await asyncio.wait_for(link.read(HANDSHAKE_BYTES), CONNECT_TIMEOUT_S))
            except asyncio.IncompleteReadError:
                raise SpeedError(f"{address} closed the link without answering") from None
            if answer.refusal:
                raise SpeedError(answer.refusal)
            return link
        except BaseException:
            link.close()
            raise


class RingLink:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    def send(self, control: pb.RingControl) -> None:
        """Queue one control message; ConnectionError where the link has ended."""
        if self._writer.is_closing():
            raise ConnectionError("the link is closed")
        self._writer.write(frame(control.SerializeToString()))

    async def events(self) -> AsyncIterator[pb.RingEvents]:
        """The node's events until it ends the link (ConnectionError, or SpeedError for a frame it cannot be)."""
        while True:
            try:
                payload = await self.read(MAX_EVENTS_BYTES)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise SpeedError(CUT_SHORT) from None
                return  # ended between frames
            try:
                events = pb.RingEvents.FromString(payload)
            except DecodeError:
                raise SpeedError("sent events that are not a RingEvents message") from None
            if events.refusal:
                raise SpeedError(f"refused the ring's control: {events.refusal}")
            yield events

    async def read(self, max_bytes: int) -> bytes:
        """The next frame; IncompleteReadError where the link ends in its header, SpeedError in its body."""
        length = frame_length(await self._reader.readexactly(LENGTH.size), max_bytes)
        try:
            return await self._reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise SpeedError(CUT_SHORT) from None

    def close(self) -> None:
        self._writer.close()
