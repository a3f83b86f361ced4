"""Graphs whose 4- and 8-bit products never compute a single row alone, where ONNX Runtime would compute it with a
kernel of its own.

ONNX Runtime's MatMulNBits computes one row with another kernel than several, whose sums differ in the last bits:
always with float32 arithmetic (accuracy level 1), and for 4-bit weights with int8 activations (level 4) on some
processors (runtime.executor.row_kernels). Lossless speculation needs a row's result not to depend on its batch: a
speculative pass runs more rows than a sequential one. In the graph derived here such a product's input gets a
second row, a copy of the first, when its call has one row. The copy goes on through the row-wise operators after
the product (norms, residual sums, the feed-forward's activations, the next products), where it stays a copy, and
is dropped before any other operator (attention over the row's cache, reshapes) and at the graph's outputs: a
stage of SmolLM2 pads and slices twice a layer, and its attention still runs one row. (Before, a single token ran
as one of two cache rows through the whole graph: a neighbour's attention over a history of 1000 positions cost more
than the token's own layers.)

Every product of a stage or classifier graph takes the same rows (the tokens of the call), so the rows are counted
once, at the first product's input: pad = max(2 - rows, 0) rows, and the rows kept where the copy is dropped are 1
where it was added, all of them otherwise.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

FLOAT32_ARITHMETIC, INT8_ACTIVATIONS = 1, 4  # MatMulNBits accuracy levels (0, unset, computes as 1)
PREFIX = "paired_rows"
# operators computing each row of their output from that row of their inputs
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Sigmoid", "Tanh", "Erf", "Relu", "Neg", "Reciprocal", "Cast",
               "Identity"}
ALL_ROWS = 2**62  # a Slice end beyond any row count


def product_kind(node: onnx.NodeProto) -> tuple[int, int]:
    """A MatMulNBits node's (weight bits, accuracy level)."""
    attributes = {attribute.name: attribute.i for attribute in node.attribute}
    return attributes.get("bits", 4), attributes.get("accuracy_level", 0) or FLOAT32_ARITHMETIC


def paired_rows_graph(source: str | bytes, kinds: Collection[tuple[int, int]]) -> bytes:
    """The serialized graph at `source` (a path, or a serialized graph) whose MatMulNBits products of these kinds,
    (bits, accuracy level), compute a single row beside a copy of it (the module's docstring)."""
    import onnx

    model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source)
    pair_single_rows(model.graph, kinds)
    return model.SerializeToString()


def pair_single_rows(graph: onnx.GraphProto, kinds: Collection[tuple[int, int]]) -> None:
    from onnx import TensorProto, helper, numpy_helper

    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    constants |= {node.output[0]: numpy_helper.to_array(attribute.t) for node in graph.node if node.op_type == "Constant"
                  for attribute in node.attribute if attribute.name == "value"}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def row_wise(node: onnx.NodeProto) -> bool:
        """Whether each row of the node's outputs depends on that row of its inputs alone (a second row, a copy of
        the first, then stays a copy of it), and its other inputs broadcast over rows."""
        attributes = {attribute.name: attribute for attribute in node.attribute}
        if node.op_type in ELEMENTWISE or node.op_type == "MatMulNBits":
            return True
        if node.op_type == "MatMul":  # by a constant matrix
            return node.input[1] in constants and constants[node.input[1]].ndim == 2
        if node.op_type == "ReduceMean":  # over the last axis
            axes = constants.get(node.input[1]) if len(node.input) > 1 else None
            return axes is not None and axes.tolist() == [-1]
        if node.op_type == "Split":  # along the last axis, into row-wise readers only (else the copy goes before it)
            axis = attributes["axis"].i if "axis" in attributes else 0
            return axis == -1 and all(row_wise(reader) for name in node.output for reader in readers.get(name, []))
        return False

    def constant(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [f"{PREFIX}/{name}"], name=f"{PREFIX}/{name}",
                                value=helper.make_tensor(f"{PREFIX}/{name}_value", TensorProto.INT64, [len(values)],
                                                         values))

    def op(kind: str, inputs: list[str], output: str, **attributes) -> onnx.NodeProto:
        return helper.make_node(kind, inputs, [output], name=output, **attributes)

    p = PREFIX
    nodes: list[onnx.NodeProto] = []
    paired: dict[str, str] = {}  # tensor -> its paired form, a second row where its call has one
    unpaired: set[str] = set()  # paired tensors whose own name is made again, by slicing the paired form
    counted = False

    def unpair(name: str) -> None:
        if name in paired and name not in unpaired:
            nodes.append(op("Slice", [paired[name], f"{p}/zero", f"{p}/kept", f"{p}/zero"], name))
            unpaired.add(name)

    for node in graph.node:
        pairs = node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and product_kind(node) in kinds
        if pairs and not counted:  # the rows of this call, from the first product's input (B, ..., K)
            nodes += [constant("zero", [0]), constant("one", [1]), constant("two", [2]), constant("all", [ALL_ROWS]),
                      op("Shape", [node.input[0]], f"{p}/leading", end=-1),
                      op("ReduceProd", [f"{p}/leading"], f"{p}/rows", keepdims=1),
                      op("Sub", [f"{p}/two", f"{p}/rows"], f"{p}/short"),
                      op("Max", [f"{p}/short", f"{p}/zero"], f"{p}/added"),
                      op("Concat", [f"{p}/zero", f"{p}/added"], f"{p}/pads", axis=0),
                      op("Greater", [f"{p}/added", f"{p}/zero"], f"{p}/was_added"),
                      op("Where", [f"{p}/was_added", f"{p}/one", f"{p}/all"], f"{p}/kept")]
            counted = True
        if pairs and node.input[0] not in paired:
            source = node.input[0]
            paired[source] = f"{p}/{source}/paired"
            unpaired.add(source)  # the tensor itself stays as it was
            nodes.append(op("Pad", [source, f"{p}/pads", "", f"{p}/zero"], paired[source], mode="edge"))
        if (pairs or row_wise(node)) and any(name in paired for name in node.input):
            node.input[:] = [paired.get(name, name) for name in node.input]
            for i, name in enumerate(node.output):
                paired[name] = node.output[i] = f"{p}/{name}/paired"
        else:
            for name in node.input:
                unpair(name)
        nodes.append(node)
    for output in graph.output:
        unpair(output.name)
    del graph.node[:]
    graph.node.extend(nodes)
