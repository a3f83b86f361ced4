"""Stage graphs whose attention is ONNX Runtime's one fused operator, writing the cache in place.

A bundle's stage graph computes each layer's attention in about twenty operators (head reshapes and
transposes, the rotary embedding of queries and keys, products with the cache and with the new keys,
one mask, softmax) and returns the new keys and values for the caller to append. On the CPU each operator
costs a few microseconds however small it is, and SmolLM2-135M's decoding runs hundreds of them a token.
The node derives from each stage graph one where every layer's attention is com.microsoft
GroupQueryAttention: rotary embedding, attention over the row's own cache length and the write of the new
entries in one operator, which reads the cache with keys laid out by position, (B, Hkv, C, hd), and
writes into that very buffer when its outputs `written_key_{l}` and `written_value_{l}` are bound to it
(ONNX Runtime IOBinding, as for runtime.executor.cache_writing).

Each row attends over its own cache length only, so its result does not depend on the cache's capacity or on
the rows beside it. The projections, norms and feed-forward layers are the bundle graph's own operators.
Every row of a call gets its new entries at its cache length, a row riding along in the call too: a cache
with keys by position keeps a spare position a row for a full one (KVCache). ONNX Runtime takes several new
tokens after a cache for one row a call only, so OnnxStageModel runs such calls a row at a time.

Graphs exported with the fused rotary embedding (runtime.models.export) have the pattern this rewrites; for
any other graph (older exports) `fused_attention_graph` raises ValueError and the node runs the graph itself
(`speed export BUNDLE OUT_DIR` exports such a bundle again).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime.executor.cache_writing import WRITES, load_cache_graph, written_names

if TYPE_CHECKING:
    import onnx

SEQUENCE_LENGTHS = "fused_attention/seqlens_k"  # each row's last position after the call, int32
TOTAL_LENGTH = "fused_attention/total_sequence_length"  # the longest row's length after the call, int32


class _Graph:
    """Who produces and who reads each tensor of a graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {name: node for node in graph.node for name in node.output}
        self.readers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)

    def made_by(self, name: str, op_type: str):
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            raise ValueError(f"{name} is not made by {op_type}")
        return node

    def only_reader(self, name: str, op_type: str):
        readers = self.readers.get(name, [])
        if len(readers) != 1 or readers[0].op_type != op_type:
            raise ValueError(f"{name} is not read by {op_type} alone")
        return readers[0]


def fused_attention_graph(path: Path) -> bytes:
    """The serialized graph with fused attention derived from the stage or exit graph at `path`; ValueError
    where its attention does not have the exported pattern."""
    return fused_attention_model(path).SerializeToString()


def fused_attention_model(path: Path) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper  # only where a graph is derived, as load_cache_graph

    model, layers = load_cache_graph(path)
    graph = model.graph
    inputs = {arg.name: arg for arg in graph.input}
    key_dims = [dim.dim_value for dim in inputs["cache_key_0"].type.tensor_type.shape.dim]  # (B, Hkv, hd, C)
    kv_heads, head_size = key_dims[1], key_dims[2]
    d_model = inputs["hidden"].type.tensor_type.shape.dim[2].dim_value
    if not (kv_heads and head_size and d_model) or d_model % head_size:
        raise ValueError(f"{path.name}: the head sizes cannot be read from its inputs")
    found = _Graph(graph)
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    constants |= {node.output[0]: numpy_helper.to_array(attribute.t) for node in graph.node if node.op_type == "Constant"
                  for attribute in node.attribute if attribute.name == "value"}

    def rotary_input(rotated: str) -> tuple[object, str]:
        """The RotaryEmbedding node making `rotated`, and the (B, T, heads x hd) projection it rotates."""
        rotary = found.made_by(rotated, "RotaryEmbedding")
        heads_first = found.made_by(rotary.input[0], "Transpose")
        return rotary, found.made_by(heads_first.input[0], "Reshape").input[0]

    extended: dict[str, str] = {}

    def beyond_the_context(table: str) -> str:
        """The cos or sin table with one more row: a row full to the model's context that rides along in a call
        is written at the position after it (its spare position, KVCache), and that position must have a
        row; what is written there is never read."""
        if table not in extended:
            if table not in constants:
                raise ValueError(f"the rotary table {table} is not a constant")
            values = constants[table]
            extended[table] = f"fused_attention/{table}"
            graph.initializer.append(numpy_helper.from_array(np.concatenate([values, values[-1:]]), extended[table]))
        return extended[table]

    fused, replaced = [], {}
    for layer in range(layers):
        scores = [node for node in found.readers.get(f"cache_key_{layer}", []) if node.op_type == "MatMul"]
        weighted = [node for node in found.readers.get(f"cache_value_{layer}", []) if node.op_type == "MatMul"]
        if len(scores) != 1 or len(weighted) != 1:
            raise ValueError(f"layer {layer}'s cache is not read by one product each")
        scaled = found.made_by(scores[0].input[0], "Mul")
        scale = constants.get(scaled.input[1])
        if scale is None or scale.size != 1:
            raise ValueError(f"layer {layer}'s query scale is not a constant")
        rotary, query = rotary_input(found.made_by(scaled.input[0], "Reshape").input[0])
        _, key = rotary_input(found.made_by(f"new_key_{layer}", "Transpose").input[0])
        value = found.made_by(found.made_by(f"new_value_{layer}", "Transpose").input[0], "Reshape").input[0]
        # the attention's output, back to (B, T, heads x hd): Add (cache part and new part), Reshape, Transpose,
        # an Identity in some exports, Reshape
        node = found.only_reader(weighted[0].output[0], "Add")
        node = found.only_reader(node.output[0], "Reshape")
        node = found.only_reader(node.output[0], "Transpose")
        if [reader.op_type for reader in found.readers.get(node.output[0], [])] == ["Identity"]:
            node = found.readers[node.output[0]][0]
        attended = found.only_reader(node.output[0], "Reshape").output[0]
        interleaved = next((attribute.i for attribute in rotary.attribute if attribute.name == "interleaved"), 0)
        output = f"fused_attention/out_{layer}"
        fused.append(helper.make_node(
            "GroupQueryAttention",
            [query, key, value, f"cache_key_{layer}", f"cache_value_{layer}", SEQUENCE_LENGTHS, TOTAL_LENGTH,
             *(beyond_the_context(table) for table in rotary.input[2:4])],
            [output, f"{WRITES}_key_{layer}", f"{WRITES}_value_{layer}"], name=f"fused_attention/layer_{layer}",
            domain="com.microsoft", num_heads=d_model // head_size, kv_num_heads=kv_heads, scale=float(scale),
            do_rotary=1, rotary_interleaved=interleaved))
        replaced[attended] = output

    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = replaced.get(name, name)
    one = "fused_attention/one"
    graph.initializer.append(helper.make_tensor(one, TensorProto.INT64, [], [1]))
    new_tokens = helper.make_node("Shape", ["hidden"], ["fused_attention/new_tokens"], start=1, end=2)
    ends = helper.make_node("Add", ["cache_length", new_tokens.output[0]], ["fused_attention/ends"])  # (B,)
    lengths = [
        new_tokens, ends,
        helper.make_node("Sub", [ends.output[0], one], ["fused_attention/last"]),
        helper.make_node("Cast", ["fused_attention/last"], [SEQUENCE_LENGTHS], to=TensorProto.INT32),
        helper.make_node("ReduceMax", [ends.output[0]], ["fused_attention/longest"], keepdims=0),
        helper.make_node("Cast", ["fused_attention/longest"], [TOTAL_LENGTH], to=TensorProto.INT32),
    ]
    _keep_needed(graph, [*graph.node, *lengths, *fused], ["hidden_out", *written_names(layers)])

    for layer in range(layers):  # keys by position, like values: (B, Hkv, C, hd)
        dims = inputs[f"cache_key_{layer}"].type.tensor_type.shape.dim
        dims[2].CopyFrom(inputs[f"cache_value_{layer}"].type.tensor_type.shape.dim[2])
        dims[3].CopyFrom(inputs[f"cache_value_{layer}"].type.tensor_type.shape.dim[3])
    hidden_out = [arg for arg in graph.output if arg.name == "hidden_out"]
    del graph.output[:]
    graph.output.extend(hidden_out)
    for name in written_names(layers):
        output = graph.output.add()
        output.CopyFrom(inputs[name.replace(WRITES, "cache")])
        output.name = name
    return model


def _keep_needed(graph: onnx.GraphProto, nodes: list, outputs: list[str]) -> None:
    """Make the graph's nodes those of `nodes` that the outputs need, each after the nodes it reads from, and
    drop the weights no node reads."""
    producer = {name: node for node in nodes for name in node.output}
    kept, seen = [], set()
    pending = [(producer[name], False) for name in reversed(outputs)]
    while pending:  # depth first; a node goes in once every node it reads from has
        node, inputs_done = pending.pop()
        if inputs_done:
            kept.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            pending.append((node, True))
            pending.extend((producer[name], False) for name in reversed(node.input) if name in producer)
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for node in kept for name in node.input}
    weights = [tensor for tensor in graph.initializer if tensor.name in read]
    del graph.initializer[:]
    graph.initializer.extend(weights)
