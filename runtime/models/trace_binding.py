"""Traces of a model's graphs, kept without their weights and bound to other weights.

Tracing a model to ONNX is the largest part of an import (SmolLM2-135M: 12 s for a stage of ten layers and
2 s for the head, of 26 s for float32), and what it gives depends on the architecture only. So each trace is kept
(runtime.models.trace_cache) with its weights stripped, named by everything it depends on: the model's
configuration, the layers it holds, the code that defines and exports the model, and the exporter's and
Python's versions. A later export of the same architecture (another stage split, another kind of weights,
another fine-tune) binds its own weights into it instead of tracing again. A stage's trace is kept with its
layers numbered from 0 and renumbered when bound, and without the exporter's notes (each operation's source
line and module, the graph's signature: they name layers, and this machine's paths), so a bound graph is byte
for byte the graph a trace of its own would give.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
from pathlib import Path

import numpy as np
import onnx
import onnxscript
import torch
from onnx import numpy_helper

from runtime.core.config import ModelConfig
from runtime.models.trace_cache import read_trace, write_trace

LAYER_WEIGHT = re.compile(r"model\.layers\.(\d+)\.")  # initializer names are the torch parameter names
log = logging.getLogger("speed.export")


def trace_key(cfg: ModelConfig, graph: str) -> str:
    """The name of `graph` ("head", "stage of 10 layers") of a model of `cfg`: a digest of all it depends on."""
    described = cfg.to_dict()
    described.pop("stage_sizes", None)
    if not cfg.shared_layers:
        del described["n_stages"]  # a stage of distinct layers is the same graph however the rest is split
    digest = hashlib.sha256(json.dumps([described, graph, platform.python_version(), torch.__version__,
                                        onnx.__version__, onnxscript.__version__], sort_keys=True).encode())
    models = Path(__file__).parent
    for source in sorted(models.glob("*.py")) + [models.parent / "core" / "config.py"]:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:32]


def load_trace(key: str) -> onnx.ModelProto | None:
    """The kept trace named `key`, or None when there is none or it cannot be read (it is traced again)."""
    data = read_trace(key)
    if data is None:
        return None
    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - a damaged entry of any kind is only a slower export
        log.warning("traced again: the kept trace %s cannot be read (%s)", key, exc)
        return None


def keep_trace(key: str, traced: onnx.ModelProto, weights: dict[str, torch.Tensor], *, first_layer: int = 0
               ) -> onnx.ModelProto:
    """`traced` without the values of `weights`, its layers numbered from 0 (its first is `first_layer`), kept
    as `key` where the cache can be written; returns that stripped trace. `traced` loses those values too."""
    for tensor in traced.graph.initializer:
        if tensor.name.removeprefix("model.") in weights:
            _strip(tensor)  # before the copy below: a stage's weights are copied no more
    trace = _rebound(traced, {}, shift=-first_layer)
    for described in [trace.graph, *trace.graph.node, *trace.graph.value_info, *trace.graph.input, *trace.graph.output]:
        del described.metadata_props[:]
    write_trace(key, trace.SerializeToString())
    return trace


def bind(trace: onnx.ModelProto, weights: dict[str, torch.Tensor], *, first_layer: int = 0) -> onnx.ModelProto:
    """A copy of a stripped `trace` computing layers from `first_layer` on with `weights`: every stripped value
    given, or ValueError when `weights` lack one."""
    graph = _rebound(trace, weights, shift=first_layer)
    missing = [t.name for t in graph.graph.initializer if _stripped(t)]
    if missing:
        raise ValueError(f"no weight for {len(missing)} of the trace's values, e.g. {missing[0]}")
    return graph


def _rebound(graph: onnx.ModelProto, weights: dict[str, torch.Tensor], *, shift: int) -> onnx.ModelProto:
    """A copy of `graph` whose layers' values are renamed `shift` layers on, and whose values named after
    `weights` (model.<parameter>) hold them. Values the trace lifted that are no parameter (rotary tables) are
    kept as they are."""
    copy = onnx.ModelProto()
    copy.CopyFrom(graph)
    renamed = {}
    for tensor in copy.graph.initializer:
        layer = LAYER_WEIGHT.match(tensor.name)
        if layer is not None and shift:
            renamed[tensor.name] = tensor.name = f"model.layers.{int(layer[1]) + shift}.{tensor.name[layer.end():]}"
        weight = weights.get(tensor.name.removeprefix("model."))
        if weight is None:
            continue
        if tuple(tensor.dims) != tuple(weight.shape):
            raise ValueError(f"{tensor.name} is {tuple(weight.shape)} in the model and {tuple(tensor.dims)} in the trace")
        tensor.CopyFrom(numpy_helper.from_array(weight.detach().numpy(), tensor.name))
    for node in copy.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    for value in copy.graph.value_info:
        value.name = renamed.get(value.name, value.name)
    return copy


def _strip(tensor: onnx.TensorProto) -> None:
    dims, data_type, name = list(tensor.dims), tensor.data_type, tensor.name
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    tensor.dims.extend(dims)


def _stripped(tensor: onnx.TensorProto) -> bool:
    """Whether `tensor` has a shape with values but holds none (an empty raw_data and no typed data either)."""
    if not int(np.prod(tensor.dims)) or tensor.raw_data or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    return not any(len(getattr(tensor, field)) for field in
                   ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"))
