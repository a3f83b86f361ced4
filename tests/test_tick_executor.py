"""The local tick executor: protocol checks and cache bookkeeping on a real ONNX Runtime session."""

import numpy as np
import pytest

from nodes.executor import OnnxStageModel
from nodes.kv_cache import KVCache
from nodes.tick_executor import TickExecutor
from runtime.bundle import load_bundle
from runtime.errors import SpeedError
from runtime.speed_core import Item, TickPlan, Truncate


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
    predictions = executor.run(TickPlan([], [prompt], []))
    assert set(predictions) == {(1, 0)}
    row = 0 * 2 + 1  # stage-major: stage 0, slot 1
    assert executor.cache.lengths.tolist() == [0, 4, 0, 0, 0, 0]
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
