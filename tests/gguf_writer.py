"""A small Llama written as GGUF the way llama.cpp writes it (query/key rows permuted, some tensors quantized),
for the tests of `speed import gguf` and of what is built on an imported bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize

from runtime.core.config import ModelConfig
from runtime.models.decoder import SpeedDecoder
from runtime.models.gguf_file import TENSOR_NAMES

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# how llama.cpp stores each kind of tensor in this file: norms stay float32, the rest is quantized
TYPES = {"attn_q": GGMLQuantizationType.F32, "attn_k": GGMLQuantizationType.Q8_0,
         "ffn_up": GGMLQuantizationType.Q4_1, "ffn_down": GGMLQuantizationType.F16,
         "token_embd": GGMLQuantizationType.Q8_0}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to query/key rows (convert_hf_to_gguf.py's permute)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path: Path, model: SpeedDecoder, tokenizer_json: dict, *, architecture: str = "llama",
               types: dict[str, GGMLQuantizationType] = TYPES) -> dict:
    """The model as a GGUF file; returns the weights an exact importer must recover (quantization included).
    A type this `gguf` cannot quantize is written as zero bytes of the right size (for refusal tests)."""
    cfg = model.cfg
    tokens = sorted(tokenizer_json["model"]["vocab"], key=tokenizer_json["model"]["vocab"].get)
    tokens += ["<|im_start|>", "<|im_end|>"]
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(cfg.n_distinct_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(m) for m in tokenizer_json["model"]["merges"]])
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template(CHAT_TEMPLATE)
    state = model.state_dict()
    expected = {}
    for gguf_name, name in TENSOR_NAMES.items():
        for i in range(cfg.n_distinct_layers) if "{i}" in gguf_name else [None]:
            weight = state[name.format(i=i)].numpy()
            kind = next((t for part, t in types.items() if part in gguf_name), GGMLQuantizationType.F32)
            stored = weight
            if "attn_q" in gguf_name or "attn_k" in gguf_name:
                stored = llama_cpp_permute(weight, cfg.n_heads if "attn_q" in gguf_name else cfg.n_kv_heads)
            if kind == GGMLQuantizationType.F32:
                data, expected_weight = stored, weight
            elif kind == GGMLQuantizationType.Q8_1:  # no quantizer here: bytes of the right size
                data = np.zeros(quant_shape_to_byte_shape(stored.shape, kind), dtype=np.uint8)
                expected_weight = None
            else:
                data = quantize(stored, kind)
                expected_weight = dequantize(quantize(weight, kind), kind)
            writer.add_tensor(gguf_name.format(i=i), data, raw_dtype=kind)
            expected[name.format(i=i)] = expected_weight
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def source_config(tokenizer_json: dict) -> ModelConfig:
    """A 5-layer Llama: three stages split it unevenly, 2 + 2 + 1."""
    return ModelConfig(vocab_size=len(tokenizer_json["model"]["vocab"]) + 2, d_model=64, n_heads=4, n_kv_heads=2,
                       ffn_hidden=128, n_distinct_layers=5, n_stages=3, context_length=256, shared_layers=False)
