"""Typed, validated model configuration (no torch: nodes read it from bundle manifests)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from runtime.errors import SpeedError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096  # tokens, including the special ones
    d_model: int = 256  # width of the residual stream
    n_heads: int = 8  # query heads
    n_kv_heads: int = 4  # key/value heads (grouped-query attention when < n_heads)
    ffn_hidden: int = 768  # SwiGLU inner width
    n_distinct_layers: int = 4  # N_d: layers with their own weights, forming one stage
    n_stages: int = 3  # G: how many times the group of N_d layers is applied
    context_length: int = 1024  # longest sequence (prompt + generated), in tokens
    rope_base: float = 10000.0  # rotary position base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            accepted = (int, float) if field.type == "float" else (int,)
            if isinstance(value, bool) or not isinstance(value, accepted):
                raise SpeedError(f"model config {field.name}: expected {field.type}, got {value!r}")
            if value <= 0:
                raise SpeedError(f"model config {field.name}: must be positive, got {value}")
        if self.d_model % self.n_heads:
            raise SpeedError(f"model config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise SpeedError(f"model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise SpeedError(f"model config: head size {self.head_dim} must be even for rotary positions")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def name(self) -> str:
        """The paper's "N_d x G" name, e.g. 4x3."""
        return f"{self.n_distinct_layers}x{self.n_stages}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "model config") -> ModelConfig:
        if not isinstance(data, dict):
            raise SpeedError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpeedError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")
        return cls(**data)
