"""`speed train-exit BUNDLE`: exits that make a model's early stages guess better.

A model not trained for early exit predicts poorly from its early stages through the shared final
norm + LM head, so speculation flushes often. For every early stage s this trains an exit between the
stage's hidden state and the head, distilled from the model's own final distribution (KL divergence):

- low-rank: h -> h + (h @ A) @ B, B starting at zero (the plain head);
- affine:   h -> h + h @ W + b, full rank, starting at the plain head (the tuned-lens design);
- layer:    one decoder layer over the stage's hidden states, attending to its own past positions
            (the Kangaroo / EAGLE design): a copy of the model's last layer whose output projections
            start at zero, so it too starts as the plain head. At run time it keeps a KV cache of its
            own beside the stage's, rolled back with it.

The model is frozen; its hidden states are computed once over offline text (held-out Shakespeare is
never trained on, nor every fifth module of Python's standard library), and every kind is measured on
the same held-out positions. Exits change guesses only: committed tokens come from the last stage's
plain head, so the text is the same with or without them.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.core.bundle import Bundle, load_bundle, update_bundle
from runtime.core.config import EXIT_KINDS
from runtime.core.errors import SpeedError
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.models.corpus import load_python_sources, load_shakespeare
from runtime.models.decoder import SpeedDecoder, apply_rotary, rotary_tables
from runtime.models.guess_gate import Calibration, calibrate
from runtime.models.torch_backend import model_from_bundle


@dataclass(frozen=True)
class ExitTraining:
    kind: str = "layer"
    steps: int = 600
    rank: int = 256  # low-rank only
    lr: float = 1e-3
    windows_per_step: int = 2
    window: int = 128  # tokens per window of text
    train_windows: int = 128
    held_out_windows: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in EXIT_KINDS:
            raise SpeedError(f"--kind must be one of {', '.join(EXIT_KINDS)}, got {self.kind!r}")
        for name in ("steps", "rank", "windows_per_step", "window", "train_windows", "held_out_windows"):
            if getattr(self, name) < 1:
                raise SpeedError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SpeedError(f"--lr must be positive, got {self.lr}")


def windows_of(bundle: Bundle, texts: list[str], count: int, window: int, rng: np.random.Generator) -> torch.Tensor:
    ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in bundle.tokenizer().encode_batch(texts)])
    if len(ids) < window:
        raise SpeedError("not enough text to train on")
    starts = rng.integers(0, len(ids) - window, size=count)
    return torch.from_numpy(np.stack([ids[s : s + window] for s in starts]))


@torch.no_grad()
def stage_features(model: SpeedDecoder, windows: torch.Tensor) -> list[torch.Tensor]:
    """Per stage, the hidden state after it: (windows, T, d)."""
    per_stage: list[list[torch.Tensor]] = [[] for _ in range(model.cfg.n_stages)]
    for batch in windows.split(4):
        for stage, h in enumerate(model.stage_hiddens(batch)):
            per_stage[stage].append(h)
    return [torch.cat(h) for h in per_stage]


class LowRankExit(torch.nn.Module):
    def __init__(self, d_model: int, rank: int):
        super().__init__()
        self.down = torch.nn.Parameter(torch.randn(d_model, rank) * d_model**-0.5)
        self.up = torch.nn.Parameter(torch.zeros(rank, d_model))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + (hidden @ self.down) @ self.up

    def tables(self) -> list[np.ndarray]:
        return [self.down.detach().numpy(), self.up.detach().numpy()]


class AffineExit(torch.nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(d_model, d_model))
        self.bias = torch.nn.Parameter(torch.zeros(d_model))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + hidden @ self.weight + self.bias

    def tables(self) -> list[np.ndarray]:
        return [self.weight.detach().numpy(), self.bias.detach().numpy()]


class LayerExit(torch.nn.Module):
    """One decoder layer over a window of a stage's hidden states (positions from 0), as the exported
    graph runs it one tick at a time against its cache."""

    def __init__(self, model: SpeedDecoder):
        super().__init__()
        self.layer = copy.deepcopy(model.layers[len(model.layers) - 1])
        self.layer.requires_grad_(True)
        with torch.no_grad():  # both residual branches start at zero: the exit starts as the plain head
            self.layer.attn.wo.weight.zero_()
            self.layer.mlp.down.weight.zero_()
        self.head_dim, self.rope_base = model.cfg.head_dim, model.cfg.rope_base

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
        cos, sin = rotary_tables(positions, self.head_dim, self.rope_base)
        return self.layer(hidden, lambda t: apply_rotary(t, cos, sin))[0]


def make_exit(kind: str, model: SpeedDecoder, rank: int) -> torch.nn.Module:
    if kind == "low-rank":
        return LowRankExit(model.cfg.d_model, rank)
    if kind == "affine":
        return AffineExit(model.cfg.d_model)
    return LayerExit(model)


@torch.no_grad()
def predictions(model: SpeedDecoder, hidden: torch.Tensor, exit_module: torch.nn.Module | None) -> torch.Tensor:
    out = [model.classify(exit_module(h) if exit_module is not None else h).argmax(-1) for h in hidden.split(4)]
    return torch.cat(out).flatten()


def flip_rates(model: SpeedDecoder, held_out: list[torch.Tensor], exits: list[torch.nn.Module] | None) -> list[float]:
    """Per stage boundary, how often the guess after stage s differs from the prediction after s + 1."""
    guesses = [predictions(model, hidden, exits[stage] if exits else None) for stage, hidden in enumerate(held_out[:-1])]
    guesses.append(predictions(model, held_out[-1], None))
    return [round((a != b).float().mean().item(), 4) for a, b in zip(guesses, guesses[1:])]


def distill(model: SpeedDecoder, exit_module: torch.nn.Module, hidden: torch.Tensor, final: torch.Tensor,
            cfg: ExitTraining, rng: np.random.Generator, progress: Progress, stage: int) -> None:
    """Train one exit: KL(final distribution || the exit's) over random windows of the training text."""
    optimizer = torch.optim.Adam(exit_module.parameters(), lr=cfg.lr)
    with progress.task(f"stage {stage} exit: steps", total=cfg.steps):
        for step in range(cfg.steps):
            idx = torch.from_numpy(rng.integers(0, len(hidden), size=cfg.windows_per_step))
            with torch.no_grad():
                teacher = F.log_softmax(model.classify(final[idx]), -1)
            student = F.log_softmax(model.classify(exit_module(hidden[idx])), -1)
            loss = F.kl_div(student, teacher, log_target=True, reduction="sum") / teacher[..., 0].numel()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            kl = f"KL {loss.item():.3f}"
            progress.advance(status=kl)
            if (step + 1) % max(1, cfg.steps // 5) == 0:  # for logs, which get no bar
                progress.note(f"stage {stage} step {step + 1}/{cfg.steps}  {kl}")


def train_exits(bundle_path: Path, cfg: ExitTraining, *, progress: Progress = NO_PROGRESS) -> dict:
    bundle = load_bundle(bundle_path)
    G = bundle.config.n_stages
    if G < 2:
        raise SpeedError(f"bundle {bundle_path} has one stage: there is no early exit to train")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = model_from_bundle(bundle)
    model.requires_grad_(False)
    shakespeare, python = load_shakespeare(), load_python_sources()
    half, held_half = cfg.train_windows // 2, cfg.held_out_windows // 2
    started = time.perf_counter()
    progress.note(f"running the frozen model over {cfg.train_windows + cfg.held_out_windows} windows of {cfg.window} "
                  "tokens ...")
    train = stage_features(model, torch.cat([
        windows_of(bundle, shakespeare.train, half, cfg.window, rng),
        windows_of(bundle, python.train, cfg.train_windows - half, cfg.window, rng)]))
    held_out = stage_features(model, torch.cat([
        windows_of(bundle, shakespeare.held_out, held_half, cfg.window, rng),
        windows_of(bundle, python.held_out, cfg.held_out_windows - held_half, cfg.window, rng)]))
    before = flip_rates(model, held_out, None)
    progress.note(f"held-out flip rate per boundary before: {'  '.join(f'{x:.1%}' for x in before)}")
    exits = []
    for stage in range(G - 1):
        exits.append(make_exit(cfg.kind, model, cfg.rank))
        distill(model, exits[-1], train[stage], train[-1], cfg, rng, progress, stage)
    after = flip_rates(model, held_out, exits)
    progress.note(f"held-out flip rate per boundary after:  {'  '.join(f'{x:.1%}' for x in after)}")
    report = {"kind": cfg.kind, "steps": cfg.steps, "train_tokens": train[0].shape[0] * train[0].shape[1],
              "held_out_tokens": held_out[0].shape[0] * held_out[0].shape[1],
              "flip_rate_per_boundary_before": before, "flip_rate_per_boundary_after": after,
              "train_time_s": round(time.perf_counter() - started, 1)}
    if cfg.kind == "low-rank":
        report["rank"] = cfg.rank
    write_exits(bundle, model, exits, cfg.kind, report)
    calibrate(bundle_path, Calibration(), progress=progress)  # the gate's thresholds depend on the exits
    return report


def write_exits(bundle: Bundle, model: SpeedDecoder, exits: list[torch.nn.Module], kind: str, report: dict) -> None:
    """Into the bundle: map exits as one raw float32 file (per early stage its tables, flattened, in order),
    layer exits as one ONNX graph per stage with the stage graphs' inputs and outputs. New files get
    names from their content, so the files in use are never overwritten; old exits are removed."""
    stages = list(range(len(exits)))
    if kind == "layer":
        files = {f"exit_layer_{stage}-{digest[:12]}.onnx": data
                 for stage, data in enumerate(exit_layer_graph(model, e) for e in exits)
                 for digest in [hashlib.sha256(data).hexdigest()]}
        entry = {"kind": kind, "stages": stages, "files": list(files), "report": report}
    else:
        data = np.concatenate([table.ravel() for e in exits for table in e.tables()]).astype("<f4").tobytes()
        files = {f"exit_adapters-{hashlib.sha256(data).hexdigest()[:12]}.bin": data}
        entry = {"kind": kind, "stages": stages, "files": list(files), "report": report,
                 **({"rank": report["rank"]} if kind == "low-rank" else {})}
    old = [name for name in bundle.exit_files() if name not in files]
    update_bundle(bundle, files, removed=old, exits=entry)


def exit_layer_graph(model: SpeedDecoder, exit_module: LayerExit) -> bytes:
    """A one-layer, one-stage decoder holding the exit layer, exported like a stage graph (every exit after the
    first, here or in an earlier run, binds its weights into the first one's trace)."""
    from runtime.models.export import stage_graph

    one_layer = SpeedDecoder(replace(model.cfg, n_distinct_layers=1, n_stages=1, shared_layers=True))
    one_layer.layers[0].load_state_dict(exit_module.layer.state_dict())
    return stage_graph(one_layer.eval(), 0).SerializeToString()
