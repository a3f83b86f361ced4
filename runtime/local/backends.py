"""Choosing what runs a bundle in this process: ONNX Runtime (what nodes run) or torch eager."""

from __future__ import annotations

from runtime.core.bundle import Bundle
from runtime.core.errors import SpeedError
from runtime.executor.stage_model import StageModel

BACKENDS = ("onnx", "torch")


def open_stage_model(bundle: Bundle, *, backend: str = "onnx", device: str = "cpu", threads: int = 1) -> StageModel:
    """threads: intra-op threads, shared by every session of the process; 0 = one per core."""
    if backend == "onnx":
        from runtime.executor.onnx_stage_model import OnnxStageModel

        return OnnxStageModel(bundle, device=device, threads=threads)
    if backend == "torch":
        if device != "cpu":
            raise SpeedError("the torch backend runs on cpu only; use --backend onnx for other devices")
        if bundle.quantized:
            raise SpeedError(f"bundle {bundle.path} is quantized and the torch backend runs float32 bundles only; "
                             "use --backend onnx, or give the float32 bundle it was made from")
        try:
            from runtime.models.torch_backend import TorchStageModel
        except ImportError:
            hint = "pip install -e '.[train]' -c constraints.txt"
            raise SpeedError(f"the torch backend needs torch and onnx: {hint}") from None
        return TorchStageModel(bundle, threads=threads)
    raise SpeedError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
