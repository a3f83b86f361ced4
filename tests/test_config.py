import pytest

from runtime.core.config import ModelConfig
from runtime.core.errors import SpeedError


def test_defaults_are_the_demo_4x3():
    cfg = ModelConfig()
    assert cfg.name == "4x3"
    assert cfg.head_dim == 32


def test_round_trips_through_a_dict():
    cfg = ModelConfig(d_model=128, n_heads=4, n_kv_heads=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_keys_are_named():
    with pytest.raises(SpeedError, match="unknown key\\(s\\) n_layer"):
        ModelConfig.from_dict({"n_layer": 4})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"d_model": 100, "n_heads": 8}, "not divisible by n_heads"),
        ({"n_heads": 8, "n_kv_heads": 3}, "not a multiple of n_kv_heads"),
        ({"n_stages": 0}, "n_stages: must be positive"),
        ({"d_model": "256"}, "d_model: expected int"),
        ({"n_stages": True}, "n_stages: expected int"),
        ({"d_model": 24, "n_heads": 8, "n_kv_heads": 8}, "must be even"),
    ],
)
def test_invalid_configs_say_what_is_wrong(settings, message):
    with pytest.raises(SpeedError, match=message):
        ModelConfig(**settings)
