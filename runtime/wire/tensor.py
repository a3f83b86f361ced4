"""Tensors on the wire: raw little-endian bytes with a dtype name and a shape."""

from __future__ import annotations

import numpy as np

from runtime.errors import SpeedError
from runtime.wire import speed_pb2 as pb


def pack(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=array.dtype.name, shape=array.shape, data=array.tobytes())


def unpack(tensor: pb.Tensor, *, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The array in `tensor`, refused with a sentence naming `what` unless it has this dtype and shape."""
    if tensor.dtype != dtype:
        raise SpeedError(f"{what} must be {dtype}, got {tensor.dtype or 'no dtype'}")
    if tuple(tensor.shape) != shape:
        raise SpeedError(f"{what} must have shape {list(shape)}, got {list(tensor.shape)}")
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(tensor.data) != expected:
        raise SpeedError(f"{what} has {len(tensor.data)} bytes of data; shape {list(shape)} of {dtype} needs {expected}")
    return np.frombuffer(tensor.data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
