"""`speed train-exit BUNDLE`: small exit adapters that make a model's early stages guess better.

A model not trained for early exit predicts poorly from its early stages through the shared final
norm + LM head, so speculation flushes often. For every early stage s this trains a low-rank residual
map, h -> h + (h @ A_s) @ B_s (B starts at zero: training starts from the plain head), by distillation:
the adapted head's prediction after stage s should be the model's own final prediction. The model is
frozen; its hidden states are computed once over offline text (held-out Shakespeare is never trained
on, nor every fifth module of Python's standard library) and the adapters train on those features.
Adapters change guesses only: committed tokens come from the last stage's plain head, so the text is
the same with or without them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.core.bundle import Bundle, load_bundle, update_bundle
from runtime.core.errors import SpeedError
from runtime.models.corpus import load_python_sources, load_shakespeare
from runtime.models.decoder import SpeedDecoder
from runtime.models.guess_gate import Calibration, calibrate
from runtime.models.torch_backend import model_from_bundle


@dataclass(frozen=True)
class ExitTraining:
    steps: int = 600
    rank: int = 256
    lr: float = 3e-3
    batch_tokens: int = 256  # positions per step
    window: int = 128  # tokens per forward pass of the frozen model
    train_windows: int = 128
    held_out_windows: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "batch_tokens", "window", "train_windows", "held_out_windows"):
            if getattr(self, name) < 1:
                raise SpeedError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SpeedError(f"--lr must be positive, got {self.lr}")


@dataclass
class Features:
    hidden: list[torch.Tensor]  # per stage (N, d), the hidden state after it
    final: torch.Tensor  # (N,) the model's own final prediction


def windows_of(bundle: Bundle, texts: list[str], count: int, window: int, rng: np.random.Generator) -> torch.Tensor:
    ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in bundle.tokenizer().encode_batch(texts)])
    if len(ids) < window:
        raise SpeedError("not enough text to train on")
    starts = rng.integers(0, len(ids) - window, size=count)
    return torch.from_numpy(np.stack([ids[s : s + window] for s in starts]))


@torch.no_grad()
def features_of(model: SpeedDecoder, windows: torch.Tensor) -> Features:
    hidden: list[list[torch.Tensor]] = [[] for _ in range(model.cfg.n_stages)]
    final = []
    for batch in windows.split(4):
        per_stage = model.stage_hiddens(batch)
        for stage, h in enumerate(per_stage):
            hidden[stage].append(h.flatten(0, 1))
        final.append(model.classify(per_stage[-1]).argmax(-1).flatten())
    return Features([torch.cat(h) for h in hidden], torch.cat(final))


class ExitAdapters(torch.nn.Module):
    def __init__(self, stages: list[int], d_model: int, rank: int):
        super().__init__()
        self.stages = stages
        self.down = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(d_model, rank) * d_model**-0.5)
                                           for _ in stages)
        self.up = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(rank, d_model)) for _ in stages)

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + (hidden @ self.down[index]) @ self.up[index]


@torch.no_grad()
def flip_rates(model: SpeedDecoder, features: Features, adapters: ExitAdapters | None) -> list[float]:
    """Per stage boundary, how often the guess after stage s differs from the prediction after s + 1."""
    predictions = []
    for stage, hidden in enumerate(features.hidden[:-1]):
        guess_input = adapters(stage, hidden) if adapters is not None else hidden
        predictions.append(torch.cat([model.classify(h).argmax(-1) for h in guess_input.split(1024)]))
    predictions.append(features.final)
    return [round((a != b).float().mean().item(), 4) for a, b in zip(predictions, predictions[1:])]


def train_exits(bundle_path: Path, cfg: ExitTraining, *, progress: Callable[[str], None] = print) -> dict:
    bundle = load_bundle(bundle_path)
    G = bundle.config.n_stages
    if G < 2:
        raise SpeedError(f"bundle {bundle_path} has one stage: there is no early exit to train")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = model_from_bundle(bundle)
    for p in model.parameters():
        p.requires_grad_(False)
    shakespeare, python = load_shakespeare(), load_python_sources()
    half, held_half = cfg.train_windows // 2, cfg.held_out_windows // 2
    started = time.perf_counter()
    progress(f"running the frozen model over {cfg.train_windows + cfg.held_out_windows} windows of {cfg.window} "
             "tokens ...")
    train = features_of(model, torch.cat([
        windows_of(bundle, shakespeare.train, half, cfg.window, rng),
        windows_of(bundle, python.train, cfg.train_windows - half, cfg.window, rng)]))
    held_out = features_of(model, torch.cat([
        windows_of(bundle, shakespeare.held_out, held_half, cfg.window, rng),
        windows_of(bundle, python.held_out, cfg.held_out_windows - held_half, cfg.window, rng)]))
    before = flip_rates(model, held_out, None)
    progress(f"held-out flip rate per boundary before: {'  '.join(f'{x:.1%}' for x in before)}")

    adapters = ExitAdapters(list(range(G - 1)), bundle.config.d_model, cfg.rank)
    optimizer = torch.optim.Adam(adapters.parameters(), lr=cfg.lr)
    n = len(train.final)
    for step in range(cfg.steps):
        idx = torch.from_numpy(rng.integers(0, n, size=cfg.batch_tokens))
        loss = sum(F.cross_entropy(model.classify(adapters(i, train.hidden[i][idx])), train.final[idx])
                   for i in range(G - 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            progress(f"step {step + 1}/{cfg.steps}  loss {loss.item() / (G - 1):.3f}")
    after = flip_rates(model, held_out, adapters)
    progress(f"held-out flip rate per boundary after:  {'  '.join(f'{x:.1%}' for x in after)}")

    report = {"rank": cfg.rank, "steps": cfg.steps, "train_tokens": n, "held_out_tokens": len(held_out.final),
              "flip_rate_per_boundary_before": before, "flip_rate_per_boundary_after": after,
              "train_time_s": round(time.perf_counter() - started, 1)}
    write_adapters(bundle, adapters, report)
    calibrate(bundle_path, Calibration(), progress=progress)  # the gate's thresholds depend on the exits
    return report


def write_adapters(bundle: Bundle, adapters: ExitAdapters, report: dict) -> None:
    """Into the bundle, as raw float32: per early stage, A (d, r) then B (r, d)."""
    table = np.stack([np.stack([down.detach().numpy().ravel(), up.detach().numpy().ravel()])
                      for down, up in zip(adapters.down, adapters.up)]).astype("<f4")
    data = table.tobytes()
    name = f"exit_adapters-{hashlib.sha256(data).hexdigest()[:12]}.bin"  # never overwrites the file in use
    old = (bundle.manifest.get("exit_adapters") or {}).get("file")
    update_bundle(bundle, {name: data}, removed=[old] if old and old != name else [],
                  exit_adapters={"file": name, "rank": report["rank"], "stages": adapters.stages, "report": report})
