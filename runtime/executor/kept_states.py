"""Hidden states that stay on the device between the stages and the classifier of one process.

Where the graphs run on a GPU, a stage's output read back to the host only to be sent again to the next stage, or
to the classifier, costs a copy each way and a wait for the GPU between the two calls. So a cache that graphs
write on the device (runtime.executor.cache_writing) has beside it a buffer of hidden states, one a cache row
(`states`, (R, 1, d)): a decode call (one new token a row) leaves its items' outputs there, and a later call of the
next stage, or the classifier, reads its input rows there by index.

A stage graph derived from the bundle's takes, instead of its cache lengths, one plan of its rows (`row_plan`,
(3, B) int64: cache lengths, sources, token ids), so that a decode call sends the device one small array:
- a source of 0 or more: the row's input is that row of `states`;
- FROM_TOKEN: the embedding of the row's token id, looked up on the device (`embedding`, (V, d));
- FROM_HIDDEN: the row's input is in the graph's own `hidden` input, the host's (another node's hop, a prompt);
- RIDES: the row has no item in the call; its input is `hidden`'s and its output is not kept.
It also gives `kept_states`: `states` with its items' rows replaced by their outputs, bound to the buffer itself so
that it is written in place. A classifier derived from the bundle's takes `states` and `state_rows` (N,) (a source
of 0 or more, or FROM_HIDDEN). The bundle's graph computes every row, so each keeps its bits: a state read from the
buffer is the output it was, and an embedding looked up on the device the host's row of the same table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runtime.executor.cache_writing import cache_writing_model

if TYPE_CHECKING:
    import onnx

STATES = "states"  # (R, 1, d) float32: the latest output of each cache row (a dummy (1, 1, d) where unused)
ROW_PLAN = "row_plan"  # (3, B) int64: a stage call's cache lengths, sources and token ids
STATE_ROWS = "state_rows"  # (N,) int64: a classifier call's sources
EMBEDDING = "embedding"  # (V, d) float32: the bundle's token embeddings, on the device
KEPT_STATES = "kept_states"  # (R, 1, d): `states` with the call's items' rows replaced by their outputs
FROM_HIDDEN, RIDES, FROM_TOKEN = -1, -2, -3  # sources other than a row of `states`


def kept_states_graph(path: Path) -> bytes:
    """The serialized stage or exit graph at `path`, derived to write its cache and to read and keep states."""
    from onnx import TensorProto, helper

    model = cache_writing_model(path)
    graph = model.graph
    width = _width(graph)
    (lengths,) = (arg for arg in graph.input if arg.name == "cache_length")
    graph.input.remove(lengths)
    graph.input.extend([helper.make_tensor_value_info(ROW_PLAN, TensorProto.INT64, [3, "rows"]),
                        helper.make_tensor_value_info(STATES, TensorProto.FLOAT, ["state_count", 1, width]),
                        helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, ["vocabulary", width])])
    nodes = _Nodes("kept/input")
    plan_row = {name: nodes.add("Gather", ROW_PLAN, nodes.constant(index), axis=0)  # (1, B) each
                for index, name in enumerate(("lengths", "sources", "tokens"))}
    nodes.add("Squeeze", plan_row["lengths"], nodes.constant(0), output="kept/cache_length")
    sources = nodes.add("Squeeze", plan_row["sources"], nodes.constant(0))
    tokens = nodes.add("Squeeze", plan_row["tokens"], nodes.constant(0))
    embedded = nodes.add("Unsqueeze", nodes.add("Gather", EMBEDDING, tokens, axis=0), nodes.constant(1))  # (B, 1, d)
    from_token = nodes.add("Reshape", nodes.add("Equal", sources, nodes.constant(FROM_TOKEN)), nodes.constant(-1, 1, 1))
    read = _read_states(nodes, sources, rank=3)
    nodes.add("Where", from_token, embedded, read, output="kept/hidden")
    own = nodes.add("Reshape", nodes.add("Not", nodes.add("Equal", sources, nodes.constant(RIDES))),  # items' rows
                    nodes.constant(-1, 1, 1))
    _read_instead(graph, nodes, {"hidden": "kept/hidden", "cache_length": "kept/cache_length"})
    graph.node.append(helper.make_node("Where", [own, "hidden_out", STATES], [KEPT_STATES], name="kept/output"))
    graph.output.append(helper.make_tensor_value_info(KEPT_STATES, TensorProto.FLOAT, None))
    return model.SerializeToString()


def read_input_from_states(graph: onnx.GraphProto) -> None:
    """A classifier graph's `hidden` (N, d) rows read from `states` where `state_rows` says so."""
    from onnx import TensorProto, helper

    graph.input.extend([helper.make_tensor_value_info(STATES, TensorProto.FLOAT, ["state_count", 1, _width(graph)]),
                        helper.make_tensor_value_info(STATE_ROWS, TensorProto.INT64, ["rows"])])
    nodes = _Nodes("kept/input")
    nodes.add("Identity", _read_states(nodes, STATE_ROWS, rank=2), output="kept/hidden")
    _read_instead(graph, nodes, {"hidden": "kept/hidden"})


def _width(graph: onnx.GraphProto) -> int | str:
    """The model's width, as the graph's `hidden` input declares it."""
    (hidden,) = (arg for arg in graph.input if arg.name == "hidden")
    width = hidden.type.tensor_type.shape.dim[-1]
    return width.dim_value or width.dim_param


def _read_states(nodes: _Nodes, sources: str, rank: int) -> str:
    """Each row `states`[source] where its source is 0 or more, else `hidden`'s row (rank 3: (B, T, d); 2: (N, d))."""
    from_states = nodes.add("Reshape", nodes.add("GreaterOrEqual", sources, nodes.constant(0)),
                            nodes.constant(-1, *[1] * (rank - 1)))
    read = nodes.add("Gather", STATES, nodes.add("Max", sources, nodes.constant(0)), axis=0)  # (rows, 1, d)
    if rank == 2:
        read = nodes.add("Squeeze", read, nodes.constant(1))
    return nodes.add("Where", from_states, read, "hidden")


def _read_instead(graph: onnx.GraphProto, nodes: _Nodes, renamed: dict[str, str]) -> None:
    """The graph's nodes read `renamed`'s values instead of its inputs of those names, and the new nodes go first
    (what reads them comes after)."""
    existing = list(graph.node)
    for node in existing:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(nodes.nodes + existing)


class _Nodes:
    """New nodes, named under a prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []

    def add(self, kind: str, *inputs: str, output: str | None = None, **attributes) -> str:
        from onnx import helper

        name = f"{self.prefix}/{kind}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(kind, list(inputs), [output or name], name=name, **attributes))
        return output or name

    def constant(self, *values: int) -> str:
        from onnx import TensorProto, helper

        return self.add("Constant", value=helper.make_tensor(f"{self.prefix}/value_{len(self.nodes)}", TensorProto.INT64,
                                                            [len(values)], list(values)))
