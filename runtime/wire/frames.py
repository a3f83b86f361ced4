"""Frames of the direct links (proto/speed/v1/speed.proto, "Direct links"): each message its length as 4
little-endian bytes, then its bytes. Every reader of them (a buffered stream here, a link's listening end in
framed_connection.py, the coordinator's asyncio link) checks a frame's header with `frame_length`."""

from __future__ import annotations

import struct
from typing import BinaryIO

from runtime.core.errors import SpeedError

LENGTH = struct.Struct("<I")
HANDSHAKE_BYTES = 4096  # the most a LinkHello or LinkAnswer frame may take
CUT_SHORT = "the link closed inside a frame"


def frame(payload: bytes) -> bytes:
    return LENGTH.pack(len(payload)) + payload


def frame_length(head: bytes | bytearray, max_bytes: int) -> int:
    """The length a frame's header (its first LENGTH.size bytes) gives; SpeedError where it is more than max_bytes,
    and the frame is not to be read."""
    (length,) = LENGTH.unpack_from(head)
    if length > max_bytes:
        raise SpeedError(f"a frame of {length} bytes is more than the {max_bytes} a link takes")
    return length


def read_frame(stream: BinaryIO, max_bytes: int) -> bytes | None:
    """The next frame's bytes from a buffered stream (a socket's makefile("rb")); None where the stream ends
    between frames; SpeedError for a frame longer than max_bytes (not read) or one the stream cuts short."""
    head = stream.read(LENGTH.size)
    if not head:
        return None
    if len(head) < LENGTH.size:
        raise SpeedError(CUT_SHORT)
    length = frame_length(head, max_bytes)
    body = stream.read(length)
    if len(body) < length:
        raise SpeedError(CUT_SHORT)
    return body
