"""A GGUF file of a Llama-family model: its metadata, tensors and tokenizer, read lazily with PyPI `gguf`. Apart
from the import that builds a bundle from it (runtime.models.gguf_import), so that a bad file or stage count is
named before torch and ONNX load (seconds).

The tokenizer (GPT-2-style byte-level BPE) and the chat template are rebuilt from the file's metadata. GGUF stores
the query and key rows of every head permuted for llama.cpp's interleaved rotary form; they are permuted back here
so the model's rotate-half form applies unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.core.config import ModelConfig
from runtime.core.errors import SpeedError

SUPPORTED_ARCHITECTURES = ("llama",)
CONTROL_TOKEN = 3  # llama.cpp's token type for special tokens such as <|im_start|>
# GGUF tensor name -> parameter name of runtime.models.decoder.SpeedDecoder ({i} is the layer)
TENSOR_NAMES = {
    "token_embd.weight": "embedding.weight",
    "output_norm.weight": "final_norm.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down.weight",
}


class GGUFModel:
    """A GGUF file's metadata and tensors, read lazily (memory-mapped by PyPI gguf)."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        if not path.is_file():
            raise SpeedError(f"{path} does not exist; get the model with `speed models pull smollm2-135m`")
        try:
            self.reader = GGUFReader(path)
        except Exception as exc:  # the reader raises many kinds on a damaged file
            raise SpeedError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it may be "
                             "truncated: download it again") from None
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.value("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise SpeedError(f"{path}: architecture {self.architecture!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def value(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            if default is None:
                raise SpeedError(f"{self.path}: metadata {key} is missing; is this a complete model file?")
            return default
        return field.contents()

    def arch(self, key: str, default=None):
        return self.value(f"{self.architecture}.{key}", default)

    def config(self, stages: int | tuple[int, ...]) -> ModelConfig:
        """stages: their count (layers split as evenly as they go), or each one's layer count."""
        layers = self.arch("block_count")
        sizes = stages if isinstance(stages, tuple) else ()
        n_stages = len(sizes) if sizes else stages
        if sizes and sum(sizes) != layers:
            raise SpeedError(f"--stage-layers {','.join(map(str, sizes))}: they add up to {sum(sizes)} layers, the model "
                             f"has {layers}; give counts that add up to {layers}")
        if not 1 <= n_stages <= layers:
            raise SpeedError(f"--stages {n_stages}: the model has {layers} layers; choose 1 to {layers}")
        d_model, n_heads = self.arch("embedding_length"), self.arch("attention.head_count")
        if self.arch("rope.dimension_count", d_model // n_heads) != d_model // n_heads:
            raise SpeedError(f"{self.path}: rotary positions over part of each head are not supported")
        return ModelConfig(
            vocab_size=len(self.value("tokenizer.ggml.tokens")), d_model=d_model, n_heads=n_heads,
            n_kv_heads=self.arch("attention.head_count_kv", n_heads), ffn_hidden=self.arch("feed_forward_length"),
            n_distinct_layers=layers, n_stages=n_stages, context_length=self.arch("context_length"),
            rope_base=float(self.arch("rope.freq_base", 10000.0)),
            norm_eps=float(self.arch("attention.layer_norm_rms_epsilon")), shared_layers=False, stage_sizes=sizes)

    def weights(self, cfg: ModelConfig) -> Iterator[Weight]:
        """Every tensor the decoder needs, dequantized and as stored, in the decoder's row order."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        for gguf_pattern, name_pattern in TENSOR_NAMES.items():
            for i in range(cfg.n_distinct_layers) if "{i}" in gguf_pattern else [None]:
                gguf_name = gguf_pattern.format(i=i)
                tensor = self.tensors.get(gguf_name)
                if tensor is None:
                    raise SpeedError(f"{self.path}: tensor {gguf_name} is missing; is this a complete model file?")
                kind = GGMLQuantizationType(tensor.tensor_type).name
                try:
                    values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
                except NotImplementedError:
                    raise SpeedError(f"{self.path}: tensor {gguf_name} is of type {kind}, which cannot be dequantized "
                                     "here; use a file quantized as F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or a "
                                     "K-quant") from None
                stored = tensor.data
                if gguf_pattern.endswith(("attn_q.weight", "attn_k.weight")):
                    heads = cfg.n_heads if "attn_q" in gguf_pattern else cfg.n_kv_heads
                    values, stored = unpermute_rotary_rows(values, heads), unpermute_rotary_rows(stored, heads)
                yield Weight(gguf_name, name_pattern.format(i=i), kind, values, stored)

    def tokenizer(self):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        if self.value("tokenizer.ggml.model") != "gpt2":
            raise SpeedError(f"{self.path}: tokenizer model {self.value('tokenizer.ggml.model')!r} is not supported; "
                             "supported: gpt2 (byte-level BPE)")
        tokens = self.value("tokenizer.ggml.tokens")
        merges = [tuple(merge.split(" ", 1)) for merge in self.value("tokenizer.ggml.merges")]
        tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        # llama.cpp's "smollm" and similar pre-tokenizers: digits one by one, then GPT-2's split
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tokenizer.decoder = decoders.ByteLevel()
        types = self.value("tokenizer.ggml.token_type")
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                      for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN])
        return tokenizer


@dataclass(frozen=True)
class Weight:
    gguf_name: str
    parameter: str  # the decoder's parameter name
    kind: str  # GGML type: F32, Q4_1, ...
    values: np.ndarray  # float32, (out, in) for a matrix
    stored: np.ndarray  # as the file stores it: for a block type, one row of bytes per output channel


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head (half, pair) -> (pair, half) row permutation of query/key weights
    (rows of values or rows of quantized blocks alike)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


