"""Stage graphs that write their new cache entries into the cache they were given.

A bundle's stage graph returns each layer's new keys and values for the caller to append. Where the
cache lives on a GPU, appending from the host would copy it across every pass, so the node derives
from each stage graph one that scatters the new entries itself, at positions cache_length..+T of
each row, and outputs the written cache (`written_key_{l}`, `written_value_{l}`). The node binds that
output to the very buffer it passed in (ONNX Runtime IOBinding): ScatterElements then writes only
the new entries, in place, on whichever device holds the cache (measured on CPU: 3 us instead of a
190 us copy of a 6 MB cache). The hidden state the graph computes is untouched, so every position
keeps the bits of the bundle's own graph.

An entry whose position lies beyond the cache's capacity is dropped (its slot keeps its old value):
rows that ride along in a call without an item of their own may be full, and must not be written
outside their row. A row with an item always has room; the caller checks that before the call. A row
riding along full to the model's context would also take rotary positions past the tables of a graph
exported with the fused rotary embedding, which fails the call: its positions are clamped to the tables'
last row, and what it computes there is never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

WRITES = "written"  # the outputs' prefix: written_key_{l}, written_value_{l}


def written_names(layers: int) -> list[str]:
    return [f"{WRITES}_key_{l}" for l in range(layers)] + [f"{WRITES}_value_{l}" for l in range(layers)]


def cache_layers(graph: onnx.GraphProto) -> int:
    """How many layers' caches a graph takes (0 for the head)."""
    names = {arg.name for arg in graph.input}
    return sum(1 for layer in range(len(names)) if f"cache_key_{layer}" in names)


def load_cache_graph(path: Path) -> tuple[onnx.ModelProto, int]:
    """The stage or exit graph at `path` and how many layers' caches it takes; ValueError for any other graph."""
    import onnx  # only where a graph is derived: a node that loads its derived copies never holds onnx

    model = onnx.load(str(path))
    layers = cache_layers(model.graph)
    if not layers:
        raise ValueError(f"{path.name} takes no cache")
    return model, layers


def cache_writing_model(path: Path) -> onnx.ModelProto:
    """The graph that writes its cache, derived from the bundle's stage or exit graph at `path`."""
    from onnx import TensorProto, helper

    model, layers = load_cache_graph(path)
    graph = model.graph
    nodes = []

    def op(kind: str, inputs: list[str], **attributes) -> str:
        name = f"cache_write/{kind}_{len(nodes)}"
        nodes.append(helper.make_node(kind, inputs, [name], name=name, **attributes))
        return name

    def constant(values: list[int]) -> str:
        return op("Constant", [], value=helper.make_tensor(f"c{len(nodes)}", TensorProto.INT64, [len(values)], values))

    # positions (B, T) = cache_length + 0..T-1; an entry is kept where its position is below the capacity
    capacity = op("Shape", ["cache_key_0"], start=3, end=4)  # (1,)
    new_tokens = op("Shape", ["hidden"], start=1, end=2)
    steps = op("Range", [op("Constant", [], value=helper.make_tensor("zero", TensorProto.INT64, [], [0])),
                         op("Squeeze", [new_tokens]),
                         op("Constant", [], value=helper.make_tensor("one", TensorProto.INT64, [], [1]))])
    positions = op("Add", [op("Unsqueeze", ["cache_length", constant([1])]), steps])
    kept = op("Less", [positions, capacity])
    slot = op("Min", [positions, op("Sub", [capacity, constant([1])])])
    rows_and_steps = op("Shape", [positions])  # (B, T)
    key_shape = op("Concat", [op("Slice", [rows_and_steps, constant([0]), constant([1])]), constant([1, 1]),
                              op("Slice", [rows_and_steps, constant([1]), constant([2])])], axis=0)  # (B,1,1,T)
    value_shape = op("Concat", [op("Slice", [rows_and_steps, constant([0]), constant([1])]), constant([1]),
                                op("Slice", [rows_and_steps, constant([1]), constant([2])]), constant([1])], axis=0)
    key_slot, key_kept = op("Reshape", [slot, key_shape]), op("Reshape", [kept, key_shape])
    value_slot, value_kept = op("Reshape", [slot, value_shape]), op("Reshape", [kept, value_shape])
    # every layer's new entries have the same shape: one index for all of them
    key_index = op("Expand", [key_slot, op("Shape", ["new_key_0"])])
    value_index = op("Expand", [value_slot, op("Shape", ["new_value_0"])])
    for layer in range(layers):
        for kind, axis, index, keep in (("key", 3, key_index, key_kept), ("value", 2, value_index, value_kept)):
            cache, new = f"cache_{kind}_{layer}", f"new_{kind}_{layer}"
            entries = op("Where", [keep, new, op("GatherElements", [cache, index], axis=axis)])
            written = f"{WRITES}_{kind}_{layer}"
            nodes.append(helper.make_node("ScatterElements", [cache, index, entries], [written], axis=axis,
                                          name=f"cache_write/{written}"))
    graph.node.extend(nodes)
    _clamp_rotary_positions(graph)
    inputs = {arg.name: arg for arg in graph.input}
    hidden_out = [arg for arg in graph.output if arg.name == "hidden_out"]
    del graph.output[:]
    graph.output.extend(hidden_out)
    for name in written_names(layers):
        cache = inputs[name.replace(WRITES, "cache")]
        output = graph.output.add()
        output.CopyFrom(cache)
        output.name = name
    return model


def _clamp_rotary_positions(graph: onnx.GraphProto) -> None:
    """Each RotaryEmbedding reads its positions through a Min with its tables' last row; rows within the
    context keep their positions, and so their bits."""
    from onnx import TensorProto, helper

    clamped: dict[tuple[str, str], str] = {}
    nodes = []
    for node in graph.node:
        if node.op_type == "RotaryEmbedding":
            positions, table = node.input[1], node.input[2]
            if (positions, table) not in clamped:
                name = f"rotary_clamp/{len(clamped)}"
                nodes += [
                    helper.make_node("Shape", [table], [f"{name}/rows"], start=0, end=1),
                    helper.make_node("Constant", [], [f"{name}/one"],
                                     value=helper.make_tensor(f"{name}/one", TensorProto.INT64, [1], [1])),
                    helper.make_node("Sub", [f"{name}/rows", f"{name}/one"], [f"{name}/last"]),
                    helper.make_node("Min", [positions, f"{name}/last"], [f"{name}/positions"]),
                ]
                clamped[positions, table] = f"{name}/positions"
            node.input[1] = clamped[positions, table]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
