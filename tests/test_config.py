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


def test_stages_of_distinct_layers_take_the_sizes_given_or_split_evenly():
    even = ModelConfig(n_distinct_layers=5, n_stages=3, shared_layers=False)
    assert [even.stage_layers(s) for s in range(3)] == [range(0, 2), range(2, 4), range(4, 5)]
    sized = ModelConfig(n_distinct_layers=5, n_stages=3, shared_layers=False, stage_sizes=(1, 3, 1))
    assert [sized.stage_layers(s) for s in range(3)] == [range(0, 1), range(1, 4), range(4, 5)]
    assert sized.max_stage_layers == 3
    assert ModelConfig.from_dict(sized.to_dict()) == sized
    assert "stage_sizes" not in even.to_dict()  # manifests of evenly split bundles read as before


@pytest.mark.parametrize(("sizes", "message"), [
    ((2, 2, 2), "3 stage\\(s\\) of 6 layers in all, but the model has 3 stages and 5 layers"),
    ((4, 1), "2 stage\\(s\\) of 5 layers"),
    ((5, 0, 0), "layer counts of at least 1"),
])
def test_stage_sizes_must_cover_every_layer_once(sizes, message):
    with pytest.raises(SpeedError, match=message):
        ModelConfig(n_distinct_layers=5, n_stages=3, shared_layers=False, stage_sizes=sizes)
    with pytest.raises(SpeedError, match="share their layers"):
        ModelConfig(stage_sizes=(4, 4, 4))
