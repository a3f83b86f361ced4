"""`speed calibrate BUNDLE`: the confidence gate's thresholds, chosen from held-out text.

A speculative guess that turns out wrong costs stage passes that are then thrown away; one held back
costs the ticks its successor waits. The gate sends a guess only when the stage that made it gives it at
least its threshold of probability. For each early stage this reads, over held-out windows, each guess's
probability and whether the model's final prediction agreed, and picks the lowest threshold above which
guesses agree at least `min_precision` of the time in every probability bin: a guess there is more often
right than wrong, so sending it is expected to save more than it wastes (a right guess after stage s
saves its token G-1-s stage passes of waiting, a wrong one wastes about as many).

Guessing at all has a price: the classifier runs for every item of the stage, to know the guess and
its probability. So the stage guesses only where the passes its sent guesses are expected to save,
sent x (2 x agreement - 1) x (G-1-s) x the stage's time, exceed one classifier call, both timed here
on one thread; otherwise its threshold is 1 and it makes no guess. (Link latency, which a right guess
also saves on a cluster, is left out: the choice errs towards not guessing.) The thresholds go into
the manifest, where nodes and the coordinator read them as every request's default.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nodes.kv_cache import KVCache
from nodes.onnx_stage_model import OnnxStageModel
from runtime.core.bundle import Bundle, load_bundle, update_bundle
from runtime.core.errors import SpeedError
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.models.corpus import held_out_windows
from runtime.models.decoder import SpeedDecoder
from runtime.models.torch_backend import model_from_bundle

BINS = 20  # probability bins of equal counts


@dataclass(frozen=True)
class Calibration:
    windows: int = 24
    window: int = 128  # tokens per window
    min_precision: float = 0.5  # a bin's guesses must agree at least this often to be sent

    def __post_init__(self) -> None:
        if self.windows < 1 or self.window < 2:
            raise SpeedError("--windows must be at least 1 and --window at least 2")
        if not 0 < self.min_precision < 1:
            raise SpeedError(f"--min-precision must be between 0 and 1, got {self.min_precision}")


class ExitReads:
    """What early stages' guesses read the head at, computed as nodes compute it: through the bundle's
    exit maps, or its one-layer exit graphs on ONNX Runtime over a window from position 0."""

    def __init__(self, bundle: Bundle):
        self.maps, layers = bundle.exit_maps(), bundle.exit_layer_graphs()
        self.layers = OnnxStageModel(bundle, stages=list(layers), threads=0) if layers else None
        self.config = bundle.config

    def __call__(self, stage: int, hidden: np.ndarray) -> np.ndarray:
        """hidden (windows, T, d) after `stage` -> (windows, T, d)."""
        if stage in self.maps:
            return self.maps[stage].apply(hidden)
        if self.layers is not None and stage in self.layers.exit_layer_stages:
            cache = KVCache(self.config, rows=len(hidden), capacity=hidden.shape[1], layers=1)
            return self.layers.run_exit_layer(stage, np.ascontiguousarray(hidden), cache, slice(0, len(hidden))).hidden
        return hidden


@torch.no_grad()
def guess_outcomes(model: SpeedDecoder, bundle: Bundle, windows: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per early stage, every held-out position's guess probability and whether the final prediction
    agreed; the guess reads the head through the stage's exit as nodes do."""
    reads = ExitReads(bundle)
    outcomes: list[tuple[list, list]] = [([], []) for _ in range(model.cfg.n_stages - 1)]
    for batch in windows.split(4):
        hidden = model.stage_hiddens(batch)
        final = model.classify(hidden[-1]).argmax(-1).flatten()
        for stage, h in enumerate(hidden[:-1]):
            h = torch.from_numpy(reads(stage, h.numpy()))
            probabilities = torch.softmax(model.classify(h).float(), -1).flatten(0, 1)
            confidence, guess = probabilities.max(-1)
            outcomes[stage][0].append(confidence.numpy())
            outcomes[stage][1].append((guess == final).numpy())
    return [(np.concatenate(c), np.concatenate(a)) for c, a in outcomes]


def choose_threshold(confidence: np.ndarray, agreed: np.ndarray, min_precision: float) -> float:
    """The lowest probability from which every bin of guesses (equal counts, highest first) agrees at
    least min_precision of the time; 0 when all do (the gate never holds back), 1 when the top bin does not."""
    order = np.argsort(-confidence, kind="stable")
    threshold = 1.0
    for chunk in np.array_split(order, min(BINS, len(order))):
        if agreed[chunk].mean() < min_precision:
            break
        threshold = float(confidence[chunk].min())
    else:
        return 0.0
    return round(threshold, 4)


def gate_report(confidence: np.ndarray, agreed: np.ndarray, threshold: float) -> dict:
    sent = confidence >= threshold
    return {"threshold": threshold, "agreement": round(float(agreed.mean()), 4),
            "sent": round(float(sent.mean()), 4),
            "agreement_sent": round(float(agreed[sent].mean()), 4) if sent.any() else None,
            "agreement_held": round(float(agreed[~sent].mean()), 4) if (~sent).any() else None}


def describe_stage(s: dict) -> str:
    if s.get("not_worth_a_classifier_call"):
        return (f"guesses agree with the final prediction {s['agreement']:.1%} of the time; the passes they would "
                "save do not pay for a classifier call per item: threshold 1, no guesses")
    sent = f"sends {s['sent']:.1%} of them"
    sent += f" (agree {s['agreement_sent']:.1%})" if s["agreement_sent"] is not None else ""
    held = f", holds back the rest (agree {s['agreement_held']:.1%})" if s["agreement_held"] is not None else ""
    return (f"guesses agree with the final prediction {s['agreement']:.1%} of the time; "
            f"threshold {s['threshold']:.3f} {sent}{held}")


def median_ms(call: Callable[[], object], repeats: int = 30) -> float:
    call()  # first-call allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def pass_costs_ms(bundle: Bundle, window: int) -> tuple[list[float], float]:
    """One row, one new token, on one thread: each early stage's pass at a `window`-entry cache, and a
    classifier call."""
    G, d = bundle.config.n_stages, bundle.config.d_model
    model = OnnxStageModel(bundle, stages=range(G - 1), threads=1)
    cache = KVCache(bundle.config, rows=1, capacity=window)
    cache.lengths[:] = window - 1
    hidden = np.random.default_rng(0).standard_normal((1, 1, d)).astype(np.float32)
    stages = [median_ms(lambda s=s: model.run_stage(s, hidden, cache, slice(0, 1))) for s in range(G - 1)]
    return stages, median_ms(lambda: model.classify(hidden[0]))


def worth_guessing(stage: dict, stage_index: int, n_stages: int, stage_ms: float, head_ms: float) -> bool:
    """Whether the passes the stage's sent guesses save outweigh a classifier call per item."""
    if stage["agreement_sent"] is None:
        return False
    saved = stage["sent"] * (2 * stage["agreement_sent"] - 1) * (n_stages - 1 - stage_index) * stage_ms
    return saved > head_ms


def calibrate(bundle_path: Path, cfg: Calibration, *, progress: Progress = NO_PROGRESS) -> dict:
    bundle = load_bundle(bundle_path)
    G = bundle.config.n_stages
    if G < 2:
        raise SpeedError(f"bundle {bundle_path} has one stage: it makes no guesses to gate")
    model = model_from_bundle(bundle)
    windows = torch.tensor(held_out_windows(bundle.tokenizer(), cfg.windows, cfg.window))
    outcomes = guess_outcomes(model, bundle, windows)
    stage_ms, head_ms = pass_costs_ms(bundle, cfg.window)
    progress.note(f"one row on one thread: early stage passes {', '.join(f'{ms:.2f}' for ms in stage_ms)} ms, "
                  f"a classifier call {head_ms:.2f} ms")
    stages = []
    for stage, (confidence, agreed) in enumerate(outcomes):
        report = gate_report(confidence, agreed, choose_threshold(confidence, agreed, cfg.min_precision))
        if report["threshold"] < 1 and not worth_guessing(report, stage, G, stage_ms[stage], head_ms):
            report = gate_report(confidence, agreed, 1.0) | {"not_worth_a_classifier_call": True}
        stages.append(report)
        progress.note(f"stage {stage}: " + describe_stage(stages[-1]))
    report = {"positions": int(len(outcomes[0][0])), "min_precision": cfg.min_precision,
              "exits": bundle.exits.get("kind"), "stage_pass_ms": [round(ms, 3) for ms in stage_ms],
              "classifier_ms": round(head_ms, 3), "stages": stages}
    update_bundle(bundle, {}, removed=[], guess_gate={"thresholds": [s["threshold"] for s in stages],
                                                      "report": report})
    return report
