"""The wire contract: generated stubs match the .proto, tensors round-trip and bad ones are refused."""

import numpy as np
import pytest

from runtime.core.errors import SpeedError
from runtime.wire import codegen
from runtime.wire.tensor import pack, unpack


def test_the_generated_stubs_are_up_to_date_with_the_proto():
    for name, text in codegen.generate().items():
        assert (codegen.WIRE_DIR / name).read_text() == text, (
            f"runtime/wire/{name} is stale: run `python -m runtime.wire.codegen`")


def test_tensors_travel_as_little_endian_bytes_with_dtype_and_shape():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = pack(array)
    assert (tensor.dtype, list(tensor.shape), tensor.data) == ("float32", [3, 4], array.astype("<f4").tobytes())
    assert (unpack(tensor, dtype="float32", shape=(3, 4), what="x") == array).all()


@pytest.mark.parametrize("dtype, shape, message", [
    ("float64", (3, 4), "x must be float64, got float32"),
    ("float32", (4, 3), r"x must have shape \[4, 3\], got \[3, 4\]"),
])
def test_a_tensor_of_the_wrong_dtype_or_shape_is_refused_with_a_sentence(dtype, shape, message):
    with pytest.raises(SpeedError, match=message):
        unpack(pack(np.zeros((3, 4), np.float32)), dtype=dtype, shape=shape, what="x")


def test_a_tensor_whose_bytes_do_not_fill_its_shape_is_refused():
    tensor = pack(np.zeros((3, 4), np.float32))
    tensor.data = tensor.data[:-4]
    with pytest.raises(SpeedError, match="has 44 bytes of data"):
        unpack(tensor, dtype="float32", shape=(3, 4), what="x")
