"""A row full to the model's context rides along in a call without an item of its own (a finished sequence in the
tick before it is closed): on every path a node may run (the bundle graph with the host writing the cache, graphs
that write their cache as a GPU runs them, fused attention), the call succeeds, the other rows get what they get
alone, and the full row keeps its entries. A graph exported with the fused rotary embedding has rotary tables
exactly as long as the context, so the full row's positions lie past them."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.core.bundle import load_bundle
from runtime.executor.onnx_stage_model import OnnxStageModel

PATHS = {"host": {"fused_attention": False}, "writes": {"device_resident": True},
         "tiles": {"device_resident": True, "decode_tiles": True}, "fused": {}}


@pytest.fixture(scope="module")
def models(tiny_bundle) -> dict[str, OnnxStageModel]:
    bundle = load_bundle(tiny_bundle)
    return {path: OnnxStageModel(bundle, threads=1, **options) for path, options in PATHS.items()}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_a_row_full_to_the_models_context_rides_along_and_keeps_its_entries(models, path, tokens):
    model = models[path]
    context = model.config.context_length
    hidden = np.random.default_rng(3).standard_normal((2, tokens, model.config.d_model)).astype(np.float32)
    alone, together = model.new_cache(rows=2, capacity=64), model.new_cache(rows=2, capacity=context)
    alone.lengths[0], together.lengths[:] = 7, [7, context]
    together.position_keys()[:, 1, :, :context] = 1.0
    together.values[:, 1, :, :context] = 2.0
    expected = model.run_stage(0, hidden[:1], alone, slice(0, 1))
    assert np.array_equal(model.run_stage(0, hidden, together, slice(0, 2))[:1], expected)
    assert (together.position_keys()[:, 1, :, :context] == 1.0).all()
    assert (together.values[:, 1, :, :context] == 2.0).all()
