"""Batch invariance: a row's results (hidden state, new keys and values, logits) are the same bits whatever
other rows share its call, however many, and whatever its cache's capacity. Lossless speculation needs it:
a speculative pass runs more rows than a sequential one, and a token must not depend on which it was in.

For every kind of bundle: float32, and int4 and int8 weights (MatMulNBits) with int8 activations (accuracy
level 4, the default) and with float32 arithmetic (level 1). A row alone is the same row in a cache of its
own with a second, idle row, as every cache of a multi-stage model has. Where ONNX Runtime computes a single
row of a product with a kernel of its own (at level 1 always, for 4-bit weights at level 4 on some processors:
runtime.executor.row_kernels), a single row's call runs graphs whose such products see two rows
(runtime.executor.paired_rows). Each kind runs the bundle's own attention operators (as a GPU does), and float32
and int4 with int8 activations also ONNX Runtime's fused attention (the CPU's default)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.core.bundle import DEFAULT_BUNDLE, load_bundle
from runtime.executor.kv_cache import KVCache
from runtime.executor.onnx_session import create_session
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.executor.paired_rows import paired_rows_graph
from runtime.executor.row_kernels import int4_row_computed_apart
from runtime.models.quantize import Quantization, quantize_bundle

pytestmark = pytest.mark.training  # it quantizes the demo bundle

KINDS = {"float32": None, "int4": Quantization("int4"), "int8": Quantization("int8"),  # int8 activations
         "int4-float-arithmetic": Quantization("int4", accuracy_level=1),
         "int8-float-arithmetic": Quantization("int8", accuracy_level=1)}
FUSED_ATTENTION = {"float32-fused-attention": None, "int4-fused-attention": Quantization("int4")}


@pytest.fixture(scope="module", params=[*KINDS, *FUSED_ATTENTION])
def model(request, tmp_path_factory) -> OnnxStageModel:
    fused = request.param in FUSED_ATTENTION
    settings_ = (FUSED_ATTENTION if fused else KINDS)[request.param]
    path = DEFAULT_BUNDLE if settings_ is None else \
        quantize_bundle(DEFAULT_BUNDLE, tmp_path_factory.mktemp("kinds") / request.param, settings_)
    model = OnnxStageModel(load_bundle(path), threads=1, fused_attention=fused)
    assert model.fused_attention == fused
    return model


calls = st.fixed_dictionaries({
    "stage": st.integers(0, 2),
    "tokens_per_row": st.integers(1, 4),
    "cached": st.lists(st.integers(1, 24), min_size=1, max_size=6),  # positions each row holds already
    "room": st.lists(st.integers(0, 40), min_size=7, max_size=7),  # capacity beyond what each cache needs
    "seed": st.integers(0, 2**32 - 1),
})


def prefilled(model: OnnxStageModel, stage: int, rows: list[np.ndarray], capacity: int, *, idle_row: bool) -> KVCache:
    """A cache whose row r holds the keys and values of stage `stage` over rows[r]'s hidden states, each
    row's computed alone."""
    cache = model.new_cache(rows=len(rows) + idle_row, capacity=capacity)
    for r, hidden in enumerate(rows):
        model.run_stage(stage, hidden[None], cache, slice(r, r + 1))
        cache.advance(r, len(hidden))
    return cache


def new_entries(cache: KVCache, row: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The keys and values a call wrote for the row's next `tokens` positions."""
    start = int(cache.lengths[row])
    return cache.position_keys()[:, row, :, start : start + tokens], cache.values[:, row, :, start : start + tokens]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(call=calls)
def test_a_rows_results_do_not_depend_on_the_rows_beside_it_or_its_cache(model, call):
    rng = np.random.default_rng(call["seed"])
    d, stage, T = model.config.d_model, call["stage"], call["tokens_per_row"]
    history = [rng.standard_normal((n, d)).astype(np.float32) for n in call["cached"]]
    x = rng.standard_normal((len(history), T, d)).astype(np.float32)
    room = call["room"]
    together = prefilled(model, stage, history, max(call["cached"]) + T + room[-1], idle_row=False)
    batch = model.run_stage(stage, x, together, slice(0, len(history)))
    batch_logits, _ = model.classify(batch[:, -1])
    for r, rows_history in enumerate(history):
        alone = prefilled(model, stage, [rows_history], len(rows_history) + T + room[r], idle_row=True)
        out = model.run_stage(stage, x[r : r + 1], alone, slice(0, 1))
        logits, _ = model.classify(out[:, -1])
        assert np.array_equal(out[0], batch[r]), f"row {r}: hidden state"
        for kind, a, b in zip(("keys", "values"), new_entries(alone, 0, T), new_entries(together, r, T)):
            assert np.array_equal(a, b), f"row {r}: new {kind}"
        assert np.array_equal(logits[0], batch_logits[r]), f"row {r}: logits"


def test_the_machine_s_own_answer_on_one_row_of_4_bit_products_is_what_a_4_bit_bundle_s_classifier_does(tmp_path):
    """The small product runtime.executor.row_kernels measures stands for a real bundle's: its classifier (4-bit, int8
    activations) gives a row alone the same bits as beside another row exactly where the machine says so."""
    bundle = load_bundle(quantize_bundle(DEFAULT_BUNDLE, tmp_path / "int4", Quantization("int4")))
    assert bundle.manifest["quantization"]["accuracy_level"] == 4
    head = create_session(bundle.head_graph, threads=1)
    rows = np.random.default_rng(3).standard_normal((2, bundle.config.d_model)).astype(np.float32)
    alone, beside = head.run(["logits"], {"hidden": rows[:1]})[0], head.run(["logits"], {"hidden": rows})[0]
    assert np.array_equal(alone[0], beside[0]) != int4_row_computed_apart()


@pytest.mark.parametrize("accuracy_level", [1, 4])
def test_a_classifier_with_paired_products_gives_a_row_alone_the_bits_it_gets_beside_others(tmp_path, accuracy_level):
    """The paired form of a 4-bit classifier: a single row is the first of two inside each product, so it gets the
    bits of the kernel for several rows, whatever this machine computes one row with; several rows are unchanged."""
    bundle = load_bundle(quantize_bundle(DEFAULT_BUNDLE, tmp_path / "int4", Quantization("int4",
                                                                                          accuracy_level=accuracy_level)))
    plain = create_session(bundle.head_graph, threads=1)
    paired = create_session(bundle.head_graph, threads=1, paired={(4, accuracy_level)})
    rows = np.random.default_rng(5).standard_normal((3, bundle.config.d_model)).astype(np.float32)
    for session in (plain, paired):
        assert [output.name for output in session.get_outputs()] == [output.name for output in plain.get_outputs()]
    several = plain.run(None, {"hidden": rows})
    assert all(np.array_equal(a, b) for a, b in zip(paired.run(None, {"hidden": rows}), several))
    alone = paired.run(None, {"hidden": rows[:1]})
    assert [value.shape[0] for value in alone] == [1] * len(alone)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(alone, several))
    untouched = paired_rows_graph(str(bundle.head_graph), {(8, accuracy_level)})  # no product of that kind
    assert b"paired_rows" not in untouched
