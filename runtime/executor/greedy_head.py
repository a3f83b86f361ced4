"""Classifier graphs that also give the probability of their greedy token, so that the logits can stay
where they were computed.

Greedy decoding needs of the classifier only each row's most likely token and, for a guess, that token's
probability (the confidence gate's input). On a GPU the logits are a row of the vocabulary each (SmolLM2:
196 KB); the node derives from each head graph one with a `probability` output, 1 / sum(exp(logits -
max)), and fetches only the tokens and those. The logits and tokens are the bundle graph's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

PROBABILITY = "probability"


def greedy_head_graph(path: Path) -> bytes:
    """The serialized head graph at `path` with a `probability` output (N,) beside its logits and tokens."""
    return greedy_head_model(path).SerializeToString()


def greedy_head_model(path: Path) -> onnx.ModelProto:
    import onnx  # only where a graph is derived, as for runtime.executor.cache_writing
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    logits = graph.output[0].name
    last_axis = helper.make_tensor("greedy/last_axis", TensorProto.INT64, [1], [-1])
    graph.initializer.append(last_axis)
    graph.node.extend([
        helper.make_node("ReduceMax", [logits, last_axis.name], ["greedy/peak"], keepdims=1),
        helper.make_node("Sub", [logits, "greedy/peak"], ["greedy/shifted"]),
        helper.make_node("Exp", ["greedy/shifted"], ["greedy/weights"]),
        helper.make_node("ReduceSum", ["greedy/weights", last_axis.name], ["greedy/total"], keepdims=0),
        helper.make_node("Reciprocal", ["greedy/total"], [PROBABILITY]),
    ])
    graph.output.append(helper.make_tensor_value_info(PROBABILITY, TensorProto.FLOAT, None))
    return model
