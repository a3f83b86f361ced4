"""Tensors on the wire: raw little-endian bytes with a dtype name and a shape."""

from __future__ import annotations

import math

import numpy as np

from runtime.core.errors import SpeedError
from runtime.wire import speed_pb2 as pb

SHOWN_CHARS = 32  # of a sender's dtype name in a refusal: a sentence never echoes a huge field
SHOWN_DIMS = 8


def pack(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=array.dtype.name, shape=array.shape, data=array.tobytes())


def unpack(tensor: pb.Tensor, *, dtype: str, shape: tuple[int, ...], what: str, finite: bool = False) -> np.ndarray:
    """The array in `tensor`, refused with a sentence naming `what` unless it has this dtype and shape
    (and, with finite=True, holds no NaN or infinity). The byte length is checked against dtype x shape
    before any of it is decoded, and nothing of the sender's is copied into the sentence whole."""
    if tensor.dtype != dtype:
        got = tensor.dtype
        shown = got if len(got) <= SHOWN_CHARS else f"a {len(got)}-character name starting {got[:SHOWN_CHARS]!r}"
        raise SpeedError(f"{what} must be {dtype}, got {shown or 'no dtype'}")
    dims = len(tensor.shape)
    if dims != len(shape) or tuple(tensor.shape) != shape:
        shown = list(tensor.shape) if dims <= SHOWN_DIMS else f"{dims} dimensions"
        raise SpeedError(f"{what} must have shape {list(shape)}, got {shown}")
    expected = math.prod(shape) * np.dtype(dtype).itemsize  # math's: numpy's takes 3 us on a short tuple
    data = tensor.data
    if len(data) != expected:
        raise SpeedError(f"{what} has {len(data)} bytes of data; shape {list(shape)} of {dtype} needs {expected}")
    array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if finite:
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise SpeedError(f"{what} holds {bad} NaN or infinite value(s); only finite numbers are accepted")
    return array
