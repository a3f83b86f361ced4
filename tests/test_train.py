"""Training: a few steps lower the loss; a resumed run equals an uninterrupted one; the precision fits the CPU."""

import json
from dataclasses import replace

import pytest
import torch

from runtime.core.bundle import load_bundle
from runtime.core.errors import SpeedError
from runtime.models import train as training
from runtime.models.checkpoint import load_checkpoint
from runtime.models.train import TrainConfig, choose_precision, train
from tests.conftest import TINY, assert_one_line_error, run_speed, tiny_training

pytestmark = pytest.mark.training  # its tests train, export, quantize or calibrate a model


def test_a_few_steps_lower_the_held_out_loss(tmp_path):
    untrained = train(tmp_path / "zero", TINY, replace(tiny_training(), steps=1), resume=False)
    trained = train(tmp_path / "some", TINY, tiny_training(), resume=False)
    assert trained["held_out"]["loss_per_stage"][-1] < untrained["held_out"]["loss_per_stage"][-1] - 0.5
    report = json.loads((tmp_path / "some" / "report.json").read_text())
    settings = tiny_training()
    assert report["tokens_seen"] == settings.steps * settings.batch_size * settings.seq_len
    assert report["precision"] == "fp32"
    assert len(report["held_out"]["flip_rate_per_boundary"]) == TINY.n_stages - 1
    assert all(0.0 <= rate <= 1.0 for rate in report["held_out"]["flip_rate_per_boundary"])


def test_resuming_continues_exactly_where_training_stopped(tmp_path):
    cfg = replace(tiny_training(), steps=6, checkpoint_every=3)
    train(tmp_path / "straight", TINY, cfg, resume=False)
    train(tmp_path / "resumed", TINY, replace(cfg, steps=3), resume=False)
    train(tmp_path / "resumed", TINY, cfg, resume=True)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert resumed["step"] == straight["step"] == 6
    for name, weight in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], weight, atol=0, rtol=0, msg=name)


X86_WITHOUT_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n\nprocessor\t: 1\nflags\t\t: fpu\n"


@pytest.mark.parametrize("cpuinfo, expected", [
    (X86_WITHOUT_BF16, "fp32"),
    (X86_WITHOUT_BF16.replace("avx512bw", "avx512bw avx512_bf16"), "bf16"),
    (X86_WITHOUT_BF16.replace("avx512bw", "avx512bw amx_tile amx_bf16"), "bf16"),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", "bf16"),  # Arm
    ("processor\t: 0\nFeatures\t: fp asimd\nmodel name\t: bf16 in a name is no flag\n", "fp32"),
    (None, "fp32"),  # no /proc/cpuinfo: not Linux
])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it_natively(monkeypatch, tmp_path, cpuinfo, expected):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    monkeypatch.setattr(training, "CPUINFO", path)
    assert choose_precision("auto") == expected
    assert choose_precision("bf16") == "bf16" and choose_precision("fp32") == "fp32"  # an explicit choice stands


def test_auto_is_the_default_and_other_precisions_are_refused():
    assert TrainConfig().precision == "auto"
    with pytest.raises(SpeedError, match="--precision must be auto, bf16 or fp32, got 'fp16'"):
        TrainConfig(precision="fp16")


def test_the_report_and_the_checkpoint_name_the_precision_auto_chose(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(X86_WITHOUT_BF16)
    monkeypatch.setattr(training, "CPUINFO", cpuinfo)
    report = train(tmp_path / "run", TINY, replace(tiny_training(), steps=1, precision="auto"), resume=False)
    assert report["precision"] == report["train_config"]["precision"] == "fp32"
    assert json.loads((tmp_path / "run" / "report.json").read_text())["precision"] == "fp32"
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["train_config"]["precision"] == "fp32"


def test_a_run_can_start_from_a_bundle_and_records_it(tiny_bundle, tmp_path):
    """From the bundle's weights the held-out loss starts where the bundle is, far below a fresh model's."""
    cfg = replace(tiny_training(), steps=1, lr=1e-6, warmup=1)
    fresh = train(tmp_path / "fresh", TINY, cfg, resume=False)
    started = train(tmp_path / "started", TINY, cfg, resume=False, init=tiny_bundle)
    assert started["held_out"]["loss_per_stage"][-1] < fresh["held_out"]["loss_per_stage"][-1] - 0.5
    assert started["initialized_from"]["bundle"] == load_bundle(tiny_bundle).manifest["name"]
    resumed = train(tmp_path / "started", TINY, replace(cfg, steps=2), resume=True)
    assert resumed["initialized_from"] == started["initialized_from"]


def test_the_agreement_loss_is_the_early_stages_divergence_from_the_last_and_moves_only_them():
    last = torch.randn(2, 5, 7)
    same = [last.clone().requires_grad_(True) for _ in range(2)] + [last.clone().requires_grad_(True)]
    assert training.agreement_loss(same).item() == pytest.approx(0.0, abs=1e-6)
    stages = [torch.randn(2, 5, 7, requires_grad=True) for _ in range(2)] + [last.clone().requires_grad_(True)]
    loss = training.agreement_loss(stages)
    loss.backward()
    assert loss.item() > 0 and stages[0].grad.abs().sum() > 0 and stages[2].grad is None  # the last is the target


def test_resume_and_init_together_are_refused_in_one_line(tiny_bundle, tmp_path):
    assert_one_line_error(run_speed("train", "--out", str(tmp_path), "--resume", "--init", str(tiny_bundle)),
                          "--resume", "--init")
