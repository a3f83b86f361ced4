"""The weight-shared ("CYCLE") decoder in torch: N_d distinct layers applied G times.

One application of the group is a *stage*. Every stage shares the same weights but keeps its own
KV cache, and one shared classifier (final RMSNorm + LM head tied to the embedding) reads the
hidden state after any stage. An imported pretrained model uses the same code with
`shared_layers=False`: its stages are contiguous ranges of distinct layers.

Decoding caches store keys transposed, (B, Hkv, hd, C), so `q @ k` needs no transpose of the
whole cache, and a step attends to the cache and to its own new tokens separately, so the cache
is never concatenated: a step costs O(new tokens) in copies whatever the context length. A decoding
step is written in as few operators as the exported graph can have, since at one token per row ONNX
Runtime's cost per operator is a large share of a step: the rotary embedding is one operator
(`rotate_at_positions`, exported as ONNX Runtime's fused RotaryEmbedding), and which cache entries and
new tokens each query sees is one additive mask built once per stage, not two masks per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.core.config import ModelConfig


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, hd/2) for integer positions (B, T)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, h, T, hd) by position, rotate-half form (first half pairs with second half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@torch.library.custom_op("speed::rotate_at_positions", mutates_args=())
def rotate_at_positions(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                        sin_table: torch.Tensor) -> torch.Tensor:
    """apply_rotary to x (B, h, T, hd) at integer positions (B, T), with cos and sin read from tables
    (positions, hd/2). One operator, so that the export can map it onto a fused kernel."""
    return apply_rotary(x, cos_table[positions][:, None], sin_table[positions][:, None])


@rotate_at_positions.register_fake
def _(x, positions, cos_table, sin_table):
    return x.new_empty(x.shape)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written as a division by the root so that ONNX Runtime fuses the exported ops into one
        # SimplifiedLayerNormalization (x * rsqrt(...) stays seven ops: 17% of a stage graph's)
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, rotate, past=None):
        """x (B, T, d) -> (B, T, d), new keys (B, Hkv, hd, T), new values (B, Hkv, T, hd).

        rotate: the rotary embedding at the tokens' positions, (B, h, T, hd) -> (B, h, T, hd).
        past: None for a whole causal sequence (training), else (keys (B, Hkv, hd, C),
        values (B, Hkv, C, hd), mask (B, 1, rep*T, C+T) from SpeedDecoder.attention_mask).
        """
        B, T, _ = x.shape
        q = rotate(self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2))  # (B,H,T,hd)
        k = rotate(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2))  # (B,Hkv,T,hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,Hkv,T,hd)
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B,H,T,hd)
        else:
            y = self._attend_with_cache(q, k, v, *past)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.wo(y), k.transpose(-1, -2), v

    def _attend_with_cache(self, q, k, v, cache_keys, cache_values, mask):
        B, H, T, hd = q.shape
        rep = H // self.n_kv_heads
        qg = q.reshape(B, self.n_kv_heads, rep * T, hd) * hd**-0.5  # query heads grouped by their KV head
        scores = torch.cat([qg @ cache_keys, qg @ k.transpose(-1, -2)], dim=-1) + mask  # (B,Hkv,rep*T,C+T)
        probs = scores.softmax(dim=-1)
        C = cache_keys.shape[-1]
        y = probs[..., :C] @ cache_values + probs[..., C:] @ v  # (B,Hkv,rep*T,hd)
        return y.reshape(B, H, T, hd)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    """A pre-norm decoder layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rotate, past=None):
        h, new_keys, new_values = self.attn(self.attn_norm(x), rotate, past)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), new_keys, new_values


class SpeedDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_distinct_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.apply(self._init_weights)
        # cos and sin (context_length, hd/2) of every position, for decoding steps; not parameters, so
        # neither in checkpoints nor in the state_dict, and exported as constants
        cos, sin = rotary_tables(torch.arange(cfg.context_length)[None], cfg.head_dim, cfg.rope_base)
        self.position_tables = cos[0, 0], sin[0, 0]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared classifier: (..., d) -> logits (..., V), LM head tied to the embedding."""
        return self.final_norm(hidden) @ self.embedding.weight.T

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Training forward: tokens (B, T) -> logits (B, T, V) after every stage, first to last."""
        return [self.classify(hidden) for hidden in self.stage_hiddens(tokens)]

    def stage_hiddens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """tokens (B, T) -> the hidden state (B, T, d) after every stage, first to last."""
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = rotary_tables(positions, self.cfg.head_dim, self.cfg.rope_base)
        x = self.embedding(tokens)  # (B, T, d)
        hiddens = []
        for stage in range(self.cfg.n_stages):
            for layer in self.stage_modules(stage):
                x, _, _ = layer(x, lambda t: apply_rotary(t, cos, sin))
            hiddens.append(x)
        return hiddens

    def stage_modules(self, stage: int) -> list[Layer]:
        return [self.layers[i] for i in self.cfg.stage_layers(stage)]

    def stage_step(self, hidden, cache_length, cache_keys, cache_values, stage: int = 0):
        """One stage over new tokens of B rows, each attending to its own stage cache.

        hidden (B, T, d); cache_length (B,) int64, the valid entries of each row's cache, which
        are also the position of its first new token; cache_keys[l] (B, Hkv, hd, C) and
        cache_values[l] (B, Hkv, C, hd) per layer l of the stage. Returns hidden (B, T, d), and per
        layer the new keys (B, Hkv, hd, T) and values (B, Hkv, T, hd) for the caller to append.
        """
        T = hidden.shape[1]
        positions = cache_length[:, None] + torch.arange(T, device=hidden.device)  # (B, T)
        cos, sin = self.position_tables
        mask = self.attention_mask(cache_length, cache_keys[0].shape[-1], T)
        new_keys, new_values = [], []
        for layer, keys, values in zip(self.stage_modules(stage), cache_keys, cache_values):
            hidden, k, v = layer(hidden, lambda t: rotate_at_positions(t, positions, cos, sin), (keys, values, mask))
            new_keys.append(k)
            new_values.append(v)
        return hidden, new_keys, new_values

    def attention_mask(self, cache_length: torch.Tensor, capacity: int, new_tokens: int) -> torch.Tensor:
        """(B, 1, rep*T, C+T), added to the scores of Attention._attend_with_cache: 0 where a query may
        look (its row's first cache_length cache entries, the new tokens up to its own), -inf elsewhere."""
        B, T, C = cache_length.shape[0], new_tokens, capacity
        rep = self.cfg.n_heads // self.cfg.n_kv_heads
        device = cache_length.device
        cached = (torch.arange(C, device=device) < cache_length[:, None]).view(B, 1, 1, C).expand(B, 1, rep * T, C)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril().repeat(rep, 1).expand(B, 1, rep * T, T)
        return torch.where(torch.cat([cached, causal], dim=-1), 0.0, float("-inf"))


def stage_loss_weights(n_stages: int) -> list[float]:
    """SPEED's weights w_i = i / sum_j j: later stages weigh more."""
    total = n_stages * (n_stages + 1) / 2
    return [i / total for i in range(1, n_stages + 1)]


def speed_loss(stage_logits: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Weighted sum of every stage's cross-entropy; also returns each stage's loss."""
    losses = [F.cross_entropy(logits.flatten(0, 1), targets.flatten()) for logits in stage_logits]
    total = sum(w * loss for w, loss in zip(stage_loss_weights(len(losses)), losses))
    return total, [loss.item() for loss in losses]
