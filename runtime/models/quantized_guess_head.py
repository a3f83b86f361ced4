"""The guess head of a quantized bundle: its classifier over the guess vocabulary only, cut from its own blocks.

A quantized bundle's classifier (an imported GGUF's 8-bit table, or `speed quantize`'s) is one MatMulNBits whose
output columns are the vocabulary's tokens, each column its own blocks, scales and zero points. The guess head
keeps the graph as it is (its norm included) with only the columns of the guess vocabulary, in its order: a
guess's logits are the classifier's own for those tokens, at the cost of the share of the table they are. Its
outputs are the guess head's, the logits and the index of the greedy one (runtime.models.export's GuessHeadGraph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def quantized_guess_head(head_graph: Path, token_ids: np.ndarray, path: Path) -> None:
    """Write to `path` the classifier at `head_graph` scoring `token_ids` only; ValueError where its logits are
    not one MatMulNBits product."""
    model = onnx.load(str(head_graph))  # the table's blocks are read in, from the bundle's files beside it
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    product = producer.get("logits")
    if product is None or product.op_type != "MatMulNBits" or len(product.input) > 4 or len(graph.output) != 2:
        raise ValueError(f"{head_graph.name}: its logits are not one MatMulNBits product")
    vocab_size = next(attribute.i for attribute in product.attribute if attribute.name == "N")
    weights = {tensor.name: tensor for tensor in graph.initializer}
    for name in product.input[1:]:  # blocks (N, blocks, bytes), scales (N x blocks), zero points (N x bytes)
        if name not in weights:
            raise ValueError(f"{head_graph.name}: the classifier's {name} is not a constant")
        table = numpy_helper.to_array(weights[name])
        rows = table.reshape(vocab_size, -1)[token_ids]
        weights[name].CopyFrom(numpy_helper.from_array(rows.reshape(-1, *table.shape[1:]), name))
    for attribute in product.attribute:
        if attribute.name == "N":
            attribute.i = len(token_ids)
    for output in graph.output:
        output.type.tensor_type.shape.dim[-1].dim_param = "guesses" if output.name == "logits" else "rows"
    greedy = graph.output[1].name
    for node in graph.node:
        node.output[:] = ["index" if name == greedy else name for name in node.output]
    graph.output[1].name = "index"
    onnx.save(model, str(path))
