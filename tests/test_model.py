"""The torch model: weight sharing, the weighted loss, and cached decoding equal to the full forward."""

import pytest
import torch

from runtime.core.config import ModelConfig
from runtime.models.decoder import SpeedDecoder, speed_loss, stage_loss_weights

CFG = ModelConfig(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=48, n_distinct_layers=2,
                  n_stages=3, context_length=64)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SpeedDecoder(CFG).eval()


def test_stages_share_weights():
    one_stage = sum(p.numel() for p in SpeedDecoder(ModelConfig(**{**CFG.to_dict(), "n_stages": 1})).parameters())
    three_stages = sum(p.numel() for p in SpeedDecoder(CFG).parameters())
    assert one_stage == three_stages


def test_forward_returns_logits_after_every_stage(model):
    tokens = torch.randint(0, CFG.vocab_size, (2, 10))
    logits = model(tokens)
    assert len(logits) == CFG.n_stages
    assert all(x.shape == (2, 10, CFG.vocab_size) for x in logits)
    assert not torch.allclose(logits[0], logits[-1])


def test_loss_weights_favour_later_stages():
    assert stage_loss_weights(3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert sum(stage_loss_weights(5)) == pytest.approx(1.0)


def test_loss_is_the_weighted_sum_of_stage_losses(model):
    tokens = torch.randint(0, CFG.vocab_size, (2, 9))
    total, per_stage = speed_loss(model(tokens[:, :-1]), tokens[:, 1:])
    assert total.item() == pytest.approx(sum(w * x for w, x in zip(stage_loss_weights(3), per_stage)), rel=1e-5)


def test_forward_is_causal(model):
    tokens = torch.randint(0, CFG.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % CFG.vocab_size
    with torch.no_grad():
        before, after = model(tokens)[-1], model(changed)[-1]
    torch.testing.assert_close(before[:, :8], after[:, :8])


def empty_caches(rows: int, capacity: int):
    L, H, hd = CFG.n_distinct_layers, CFG.n_kv_heads, CFG.head_dim
    return ([torch.zeros(rows, H, hd, capacity) for _ in range(L)], [torch.zeros(rows, H, capacity, hd) for _ in range(L)])


@torch.no_grad()
def test_cached_decoding_matches_the_full_forward(model):
    """Prefill a prefix, then feed tokens one at a time (and a chunk of three) through every stage."""
    tokens = torch.randint(0, CFG.vocab_size, (1, 14))
    expected = model(tokens)
    capacity = 20  # larger than needed: entries past the cache length must be ignored
    caches = [empty_caches(1, capacity) for _ in range(CFG.n_stages)]
    lengths = [0] * CFG.n_stages
    outputs = []
    for start, end in [(0, 6), (6, 7), (7, 8), (8, 11), (11, 14)]:
        hidden = model.embedding(tokens[:, start:end])
        per_stage = []
        for s, (keys, values) in enumerate(caches):
            hidden, new_keys, new_values = model.stage_step(hidden, torch.tensor([lengths[s]]), keys, values)
            for cache, new in zip(keys, new_keys):
                cache[..., lengths[s] : lengths[s] + (end - start)] = new
            for cache, new in zip(values, new_values):
                cache[:, :, lengths[s] : lengths[s] + (end - start)] = new
            lengths[s] += end - start
            per_stage.append(model.classify(hidden))
        outputs.append(per_stage)
    for s in range(CFG.n_stages):
        got = torch.cat([chunk[s] for chunk in outputs], dim=1)
        torch.testing.assert_close(got, expected[s], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_rows_attend_only_to_their_own_cache_length(model):
    """Two rows with different cache lengths in one call give what each gives alone."""
    keys, values = empty_caches(2, 8)
    for cache in keys + values:
        cache.normal_()
    hidden = torch.randn(2, 1, CFG.d_model)
    lengths = torch.tensor([3, 6])
    together, _, _ = model.stage_step(hidden, lengths, keys, values)
    for row in range(2):
        alone, _, _ = model.stage_step(hidden[row : row + 1], lengths[row : row + 1],
                                       [k[row : row + 1] for k in keys], [v[row : row + 1] for v in values])
        torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=1e-4)
