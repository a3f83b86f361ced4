"""Classifier graphs that give what a tick draws its tokens from, so that the logits can stay where they were
computed.

Of the classifier a greedy row needs its most likely token and, for a guess, that token's probability (the
confidence gate's input); a drawn row needs its largest logits, which decide most draws exactly
(runtime.core.sampling.choose_from_top). On a GPU the logits are a row of the vocabulary each (SmolLM2: 196 KB); the
node derives from each head graph one that also takes an inverse temperature a row and a count, and gives each row's
`count` largest logits with their tokens and the total of its tempered weights, sum(exp((logits - max) / temperature)),
and fetches those instead. The logits and greedy tokens are the bundle graph's own. Its rows may be read from hidden
states kept on the device (runtime.executor.kept_states).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runtime.executor.kept_states import read_input_from_states

if TYPE_CHECKING:
    import onnx

INVERSE_TEMPERATURE = "inverse_temperature"  # (N, 1) float32: 1 for a greedy row
TOP_COUNT = "top_count"  # (1,) int64: how many of each row's largest logits
TOP_LOGITS, TOP_TOKENS = "top_logits", "top_tokens"  # (N, count), largest first
TEMPERED_TOTAL = "tempered_total"  # (N,): the drawn token's probability is exp((its logit - max) / t) / this


def kept_logits_graph(path: Path) -> bytes:
    """The serialized head graph at `path` with the inputs and outputs above beside its logits and tokens."""
    return kept_logits_model(path).SerializeToString()


def kept_logits_model(path: Path) -> onnx.ModelProto:
    import onnx  # only where a graph is derived, as for runtime.executor.cache_writing
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    read_input_from_states(graph)
    logits = graph.output[0].name
    last_axis = helper.make_tensor("kept/last_axis", TensorProto.INT64, [1], [-1])
    graph.initializer.append(last_axis)
    graph.input.extend([helper.make_tensor_value_info(INVERSE_TEMPERATURE, TensorProto.FLOAT, ["rows", 1]),
                        helper.make_tensor_value_info(TOP_COUNT, TensorProto.INT64, [1])])
    graph.node.extend([
        helper.make_node("Mul", [logits, INVERSE_TEMPERATURE], ["kept/scaled"]),
        helper.make_node("ReduceMax", ["kept/scaled", last_axis.name], ["kept/peak"], keepdims=1),
        helper.make_node("Sub", ["kept/scaled", "kept/peak"], ["kept/shifted"]),
        helper.make_node("Exp", ["kept/shifted"], ["kept/weights"]),
        helper.make_node("ReduceSum", ["kept/weights", last_axis.name], [TEMPERED_TOTAL], keepdims=0),
        helper.make_node("TopK", [logits, TOP_COUNT], [TOP_LOGITS, TOP_TOKENS], axis=-1),
    ])
    graph.output.extend([helper.make_tensor_value_info(TEMPERED_TOTAL, TensorProto.FLOAT, None),
                         helper.make_tensor_value_info(TOP_LOGITS, TensorProto.FLOAT, None),
                         helper.make_tensor_value_info(TOP_TOKENS, TensorProto.INT64, None)])
    return model
