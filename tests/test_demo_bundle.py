"""The shipped demo model: intact, small, documented, and the same tokens from both backends."""

import json

import pytest

from runtime.core.bundle import DEFAULT_BUNDLE, load_bundle
from runtime.local.backends import open_stage_model
from tests.support import assert_backends_agree

pytestmark = pytest.mark.decoding  # the shipped model decoded by ONNX Runtime and torch

MAX_BUNDLE_BYTES = 25 * 1024 * 1024


def test_the_demo_bundle_is_intact_and_small():
    bundle = load_bundle()
    assert bundle.config.name == "4x3"
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE.iterdir())
    assert size <= MAX_BUNDLE_BYTES


def test_the_model_card_records_the_held_out_figures():
    card = (DEFAULT_BUNDLE / "MODEL_CARD.md").read_text()
    report = json.loads((DEFAULT_BUNDLE / "training_report.json").read_text())
    assert "speed train" in card
    for rate in report["held_out"]["flip_rate_per_boundary"]:
        assert f"{rate:.1%}" in card


@pytest.fixture(scope="module")
def demo_models():
    bundle = load_bundle()
    return bundle, open_stage_model(bundle, backend="onnx"), open_stage_model(bundle, backend="torch")


def test_onnx_and_torch_agree_on_the_demo_model(demo_models):
    assert_backends_agree(*demo_models, max_new_tokens=32)
