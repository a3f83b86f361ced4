"""Training: a few steps lower the loss; a resumed run equals an uninterrupted one."""

import json
from dataclasses import replace

import torch

from runtime.models.checkpoint import load_checkpoint
from runtime.models.train import train
from tests.conftest import TINY, TINY_TRAINING


def test_a_few_steps_lower_the_held_out_loss(tmp_path):
    untrained = train(tmp_path / "zero", TINY, replace(TINY_TRAINING, steps=1), resume=False)
    trained = train(tmp_path / "some", TINY, TINY_TRAINING, resume=False)
    assert trained["held_out"]["loss_per_stage"][-1] < untrained["held_out"]["loss_per_stage"][-1] - 0.5
    report = json.loads((tmp_path / "some" / "report.json").read_text())
    assert report["tokens_seen"] == TINY_TRAINING.steps * TINY_TRAINING.batch_size * TINY_TRAINING.seq_len
    assert len(report["held_out"]["flip_rate_per_boundary"]) == TINY.n_stages - 1
    assert all(0.0 <= rate <= 1.0 for rate in report["held_out"]["flip_rate_per_boundary"])


def test_resuming_continues_exactly_where_training_stopped(tmp_path):
    cfg = replace(TINY_TRAINING, steps=6, checkpoint_every=3)
    train(tmp_path / "straight", TINY, cfg, resume=False)
    train(tmp_path / "resumed", TINY, replace(cfg, steps=3), resume=False)
    train(tmp_path / "resumed", TINY, cfg, resume=True)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert resumed["step"] == straight["step"] == 6
    for name, weight in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], weight, atol=0, rtol=0, msg=name)
