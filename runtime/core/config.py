"""Typed, validated model configuration (no torch: nodes read it from bundle manifests)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from runtime.core.errors import SpeedError

EXIT_KINDS = ("layer", "low-rank", "affine")  # the early exits `speed train-exit --kind` trains


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096  # tokens, including the special ones
    d_model: int = 256  # width of the residual stream
    n_heads: int = 8  # query heads
    n_kv_heads: int = 4  # key/value heads (grouped-query attention when < n_heads)
    ffn_hidden: int = 768  # SwiGLU inner width
    n_distinct_layers: int = 4  # layers with their own weights: N_d when shared, else the whole depth
    n_stages: int = 3  # G: stages; shared: the N_d layers applied G times, else contiguous layer ranges
    context_length: int = 1024  # longest sequence (prompt + generated), in tokens
    rope_base: float = 10000.0  # rotary position base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    shared_layers: bool = True  # False: a pretrained model whose stages are ranges of distinct layers
    # not shared: layers per stage, first to last (e.g. fewer on the last, which also runs the classifier);
    # empty: as even as they go
    stage_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if field.name == "stage_sizes":
                continue
            value = getattr(self, field.name)
            if field.type == "bool":
                if not isinstance(value, bool):
                    raise SpeedError(f"model config {field.name}: expected true or false, got {value!r}")
                continue
            accepted = (int, float) if field.type == "float" else (int,)
            if isinstance(value, bool) or not isinstance(value, accepted):
                raise SpeedError(f"model config {field.name}: expected {field.type}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise SpeedError(f"model config {field.name}: expected a finite {field.type}, got {value}")
            if value <= 0:
                raise SpeedError(f"model config {field.name}: must be positive, got {value}")
        if not self.shared_layers and self.n_stages > self.n_distinct_layers:
            raise SpeedError(f"model config: {self.n_stages} stages need at least as many layers, the model has "
                             f"{self.n_distinct_layers}; choose 1 to {self.n_distinct_layers} stages")
        self._check_stage_sizes()
        if self.d_model % self.n_heads:
            raise SpeedError(f"model config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise SpeedError(f"model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise SpeedError(f"model config: head size {self.head_dim} must be even for rotary positions")

    def _check_stage_sizes(self) -> None:
        sizes = self.stage_sizes
        if not sizes:
            return
        if not isinstance(sizes, tuple) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise SpeedError(f"model config stage_sizes: expected a list of layer counts of at least 1, got {sizes!r}")
        if self.shared_layers:
            raise SpeedError("model config stage_sizes: stages that share their layers all run every one of them; "
                             "give stage sizes only to a model whose stages are ranges of distinct layers")
        if len(sizes) != self.n_stages or sum(sizes) != self.n_distinct_layers:
            raise SpeedError(f"model config stage_sizes: {len(sizes)} stage(s) of {sum(sizes)} layers in all, but the "
                             f"model has {self.n_stages} stages and {self.n_distinct_layers} layers; give one size per "
                             "stage, adding up to the layers")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def name(self) -> str:
        """The paper's "N_d x G" name, e.g. 4x3; layers over stages when they are not shared, e.g. 30L-3S."""
        if self.shared_layers:
            return f"{self.n_distinct_layers}x{self.n_stages}"
        return f"{self.n_distinct_layers}L-{self.n_stages}S"

    def stage_layers(self, stage: int) -> range:
        """The layers stage `stage` runs: all N_d when shared, else its contiguous range (stage_sizes, or
        as even as they go: the first `layers % stages` stages take one layer more)."""
        if self.shared_layers:
            return range(self.n_distinct_layers)
        if self.stage_sizes:
            start = sum(self.stage_sizes[:stage])
            return range(start, start + self.stage_sizes[stage])
        size, extra = divmod(self.n_distinct_layers, self.n_stages)
        start = stage * size + min(stage, extra)
        return range(start, start + size + (stage < extra))

    @property
    def max_stage_layers(self) -> int:
        """Cache layers a stage may need: the deepest stage's."""
        return max(len(self.stage_layers(s)) for s in range(self.n_stages))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.stage_sizes:
            del data["stage_sizes"]  # the even split, as manifests written before stage sizes say it
        else:
            data["stage_sizes"] = list(self.stage_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "model config") -> ModelConfig:
        if not isinstance(data, dict):
            raise SpeedError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            shown = ", ".join(key if key.isprintable() else repr(key) for key in unknown)
            raise SpeedError(f"{where}: unknown key(s) {shown}; known keys are {', '.join(sorted(known))}")
        sizes = data.get("stage_sizes", ())
        return cls(**{**data, "stage_sizes": tuple(sizes) if isinstance(sizes, list) else sizes})
