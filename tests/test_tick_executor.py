"""The local tick executor: protocol checks and cache bookkeeping on a real ONNX Runtime session."""

import numpy as np
import pytest

from nodes.kv_cache import KVCache
from nodes.onnx_stage_model import OnnxStageModel
from nodes.tick_executor import TickExecutor
from runtime.core.bundle import load_bundle
from runtime.core.errors import SpeedError
from runtime.core.scheduler import Item, TickPlan, Truncate


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return OnnxStageModel(load_bundle(tiny_bundle), threads=1)


def test_an_item_that_does_not_start_at_its_cache_end_is_refused(model):
    executor = TickExecutor(model, slots=1, capacity=16)
    executor.open(7)
    stray = Item(seq_id=7, start=3, length=1, stage=0, tokens=(5,), final_token=False)
    with pytest.raises(SpeedError, match="cache holds 0 positions but the item starts at 3"):
        executor.run(TickPlan([], [stray], []))


def test_items_append_their_entries_and_truncations_roll_them_back(model):
    executor = TickExecutor(model, slots=2, capacity=16)
    executor.open(0)
    executor.open(1)
    prompt = Item(seq_id=1, start=0, length=4, stage=0, tokens=(5, 6, 7, 8), final_token=False)
    result = executor.run(TickPlan([], [prompt], []))
    assert set(result.predictions) == {(1, 0)}
    row = 1 * 3 + 0  # slot-major: slot 1, stage 0
    assert executor.cache.lengths.tolist() == [0, 0, 0, 4, 0, 0]
    executor.run(TickPlan([Truncate(1, 0, 2)], [], []))
    assert executor.cache.lengths[row] == 2


def test_the_cache_refuses_to_grow_past_its_capacity(tiny_bundle):
    cfg = load_bundle(tiny_bundle).config
    cache = KVCache(cfg, rows=1, capacity=2)
    new_keys = [np.zeros((cfg.n_kv_heads, cfg.head_dim, 3), np.float32)] * cfg.n_distinct_layers
    new_values = [np.zeros((cfg.n_kv_heads, 3, cfg.head_dim), np.float32)] * cfg.n_distinct_layers
    with pytest.raises(SpeedError, match="needs 3 positions but its cache holds 2"):
        cache.append(0, new_keys, new_values, 3)
    with pytest.raises(SpeedError, match="cannot truncate"):
        cache.truncate(0, 1)


def test_a_node_hosting_later_stages_takes_hidden_states_in_and_hands_them_on(model):
    """Stages split over two executors give the same predictions as one executor hosting all."""
    cfg = model.config
    whole = TickExecutor(model, slots=1, capacity=16)
    first = TickExecutor(model, slots=1, capacity=16, stages=[0])
    rest = TickExecutor(model, slots=1, capacity=16, stages=range(1, cfg.n_stages))
    for executor in (whole, first, rest):
        executor.open(0)
    tokens = (5, 6, 7, 8)
    expected = {}
    for stage in range(cfg.n_stages):
        item = Item(0, 0, len(tokens), stage, tokens if stage == 0 else None, final_token=stage == cfg.n_stages - 1)
        expected[stage] = whole.run(TickPlan([], [item], [])).predictions[(0, 0)]
    item = Item(0, 0, len(tokens), 0, tokens, final_token=False)
    out = first.run(TickPlan([], [item], []))
    assert out.predictions[(0, 0)] == expected[0]
    handed = out.handoff
    assert handed[(0, 0)].shape == (len(tokens), cfg.d_model)
    for stage in range(1, cfg.n_stages):
        item = Item(0, 0, len(tokens), stage, None, final_token=stage == cfg.n_stages - 1)
        out = rest.run(TickPlan([], [item], []), hidden_in=handed)
        assert out.predictions[(0, 0)] == expected[stage]
        assert out.handoff == {}  # the next stage is hosted by the same executor, or there is none


def test_a_cache_keeps_its_entries_when_it_grows(tiny_bundle):
    cfg = load_bundle(tiny_bundle).config
    cache = KVCache(cfg, rows=2, capacity=4)
    cache.keys[...] = 1.0
    cache.lengths[:] = [3, 4]
    cache.resize(9)
    assert cache.keys.shape[-1] == 9 and cache.values.shape[-2] == 9
    assert (cache.keys[..., :4] == 1.0).all() and (cache.keys[..., 4:] == 0.0).all()
    assert cache.lengths.tolist() == [3, 4]
