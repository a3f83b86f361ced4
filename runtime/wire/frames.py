"""Frames of the direct links between nodes (proto/speed/v1/speed.proto, "Direct links"): each message
its length as 4 little-endian bytes, then its bytes."""

from __future__ import annotations

import struct
from typing import BinaryIO

from runtime.core.errors import SpeedError

LENGTH = struct.Struct("<I")
HANDSHAKE_BYTES = 4096  # the most a LinkHello or LinkAnswer frame may take


def frame(payload: bytes) -> bytes:
    return LENGTH.pack(len(payload)) + payload


def read_frame(stream: BinaryIO, max_bytes: int) -> bytes | None:
    """The next frame's bytes from a buffered stream (a socket's makefile("rb")); None where the stream ends
    between frames; SpeedError for a frame longer than max_bytes (not read) or one the stream cuts short."""
    head = stream.read(LENGTH.size)
    if not head:
        return None
    if len(head) < LENGTH.size:
        raise SpeedError("the link closed inside a frame")
    (length,) = LENGTH.unpack(head)
    if length > max_bytes:
        raise SpeedError(f"a frame of {length} bytes is more than the {max_bytes} a link takes")
    body = stream.read(length)
    if len(body) < length:
        raise SpeedError("the link closed inside a frame")
    return body
