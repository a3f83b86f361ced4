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

A guess never decides the text (the last stage's full classifier does), so it may be approximate: where
the classifier costs at least a quarter of a stage pass (a large vocabulary), the bundle also gets a
guess head (cut from a quantized classifier's own blocks, runtime.models.quantized_guess_head), the
classifier over the tokens most frequent in the held-out text only (a quarter of the
vocabulary by default; frequency-ranked drafting, FR-Spec 2025, cuts a draft head's cost by about 75% at
little loss of acceptance). Guesses, their probabilities and the classifier call above are then those
of the guess head, and the report gives the agreement of the full head beside it. Where the classifier
is cheap a guess head does not pay: its probabilities, over fewer tokens, are higher than the full
head's, so stage 0 runs ahead on more wrong guesses than the calls it saves are worth.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.core.bundle import Bundle, load_bundle, sha256_of, update_bundle
from runtime.core.errors import SpeedError
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.executor.onnx_session import create_session
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.models.corpus import held_out_ids, held_out_windows
from runtime.models.quantized_guess_head import quantized_guess_head

BINS = 20  # probability bins of equal counts
GUESS_SHARE = 0.25  # of the vocabulary, for a guess head
HEAD_SHARE_FOR_A_GUESS_HEAD = 0.25  # of a stage pass: a classifier costing this much gets a guess head


@dataclass(frozen=True)
class Calibration:
    windows: int = 24
    window: int = 128  # tokens per window
    min_precision: float = 0.5  # a bin's guesses must agree at least this often to be sent
    # share of the vocabulary the guess head scores; 1: no guess head; None: GUESS_SHARE where the
    # classifier costs at least HEAD_SHARE_FOR_A_GUESS_HEAD of a stage pass, else 1
    guess_vocabulary: float | None = None

    def __post_init__(self) -> None:
        if self.windows < 1 or self.window < 2:
            raise SpeedError("--windows must be at least 1 and --window at least 2")
        if self.guess_vocabulary is not None and not 0 < self.guess_vocabulary <= 1:
            raise SpeedError(f"--guess-vocabulary must be above 0 and at most 1, got {self.guess_vocabulary}")
        if not 0 < self.min_precision < 1:
            raise SpeedError(f"--min-precision must be between 0 and 1, got {self.min_precision}")


class ExitReads:
    """What early stages' guesses read the head at, computed as nodes compute it: through the bundle's
    exit maps, or its one-layer exit graphs on ONNX Runtime over a window from position 0."""

    def __init__(self, bundle: Bundle, model: OnnxStageModel):
        """model: the bundle's graphs, its exit layers among them."""
        self.maps, self.layers = bundle.exit_maps(), model

    def __call__(self, stage: int, hidden: np.ndarray) -> np.ndarray:
        """hidden (windows, T, d) after `stage` -> (windows, T, d)."""
        if stage in self.maps:
            return self.maps[stage].apply(hidden)
        if stage in self.layers.exit_layer_stages:
            cache = self.layers.new_cache(rows=len(hidden), capacity=hidden.shape[1], layers=1)
            return self.layers.run_exit_layer(stage, np.ascontiguousarray(hidden), cache, slice(0, len(hidden)))
        return hidden


def frequent_tokens(token_ids: list[int], vocab_size: int, share: float) -> np.ndarray:
    """The share of the vocabulary most frequent in token_ids (ties, and tokens never seen, by id), ascending."""
    counts = np.bincount(np.asarray(token_ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # most frequent first, then lowest id
    return np.sort(order[:max(1, round(share * vocab_size))]).astype(np.int64)


def guess_outcomes(bundle: Bundle, windows: np.ndarray, vocabulary: np.ndarray | None
                   ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per early stage, every held-out position's guess probability, whether the final prediction agreed,
    and whether the full head's guess would have: computed by the bundle's graphs on ONNX Runtime as a node
    computes them (a quantized bundle's arithmetic included), the guess reading the head through the stage's
    exit, and scoring only `vocabulary` (None: every token)."""
    model = OnnxStageModel(bundle, threads=0)
    reads = ExitReads(bundle, model)
    d_model = bundle.config.d_model
    outcomes: list[tuple[list, list, list]] = [([], [], []) for _ in range(bundle.config.n_stages - 1)]
    for batch in np.array_split(windows, -(-len(windows) // 4)):
        hidden, stage_hiddens = model.embed(batch), []
        for stage in range(bundle.config.n_stages):  # every stage its own cache, from position 0
            cache = model.new_cache(rows=len(batch), capacity=batch.shape[1])
            hidden = model.run_stage(stage, hidden, cache, slice(0, len(batch)))
            stage_hiddens.append(hidden)
        final = model.classify(stage_hiddens[-1].reshape(-1, d_model))[1]
        for stage, h in enumerate(stage_hiddens[:-1]):
            logits = model.classify(np.ascontiguousarray(reads(stage, h).reshape(-1, d_model)))[0]  # (N, V)
            scored = logits if vocabulary is None else logits[:, vocabulary]
            index = scored.argmax(-1)
            top = np.take_along_axis(scored, index[:, None], -1)
            confidence = 1 / np.exp(scored - top).sum(-1)  # the softmax at the greedy token
            guess = index if vocabulary is None else vocabulary[index]
            outcomes[stage][0].append(confidence.astype(np.float32))
            outcomes[stage][1].append(guess == final)
            outcomes[stage][2].append(logits.argmax(-1) == final)
    return [tuple(np.concatenate(part) for part in stage) for stage in outcomes]


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
    cache = model.new_cache(rows=1, capacity=window)
    cache.lengths[:] = window - 1
    hidden = np.random.default_rng(0).standard_normal((1, 1, d)).astype(np.float32)
    stages = [median_ms(lambda s=s: model.run_stage(s, hidden, cache, slice(0, 1))) for s in range(G - 1)]
    return stages, median_ms(lambda: model.classify(hidden[0]))


def head_call_ms(graph: Path, d_model: int) -> float:
    """One row on one thread through a classifier graph."""
    session = create_session(graph, threads=1)
    hidden = np.random.default_rng(0).standard_normal((1, d_model)).astype(np.float32)
    return median_ms(lambda: session.run(None, {"hidden": hidden}))


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
    tokenizer, vocab_size = bundle.tokenizer(), bundle.config.vocab_size
    windows = np.array(held_out_windows(tokenizer, cfg.windows, cfg.window), dtype=np.int64)
    stage_ms, head_ms = pass_costs_ms(bundle, cfg.window)
    share = cfg.guess_vocabulary
    if share is None:
        share = GUESS_SHARE if head_ms >= HEAD_SHARE_FOR_A_GUESS_HEAD * statistics.mean(stage_ms) else 1.0
    vocabulary = frequent_tokens(held_out_ids(tokenizer), vocab_size, share)
    vocabulary = vocabulary if len(vocabulary) < vocab_size else None
    outcomes = guess_outcomes(bundle, windows, vocabulary)
    with tempfile.TemporaryDirectory() as scratch:
        guess_head = None if vocabulary is None else Path(scratch) / "guess_head.onnx"
        if guess_head is not None:
            write_guess_head(bundle, vocabulary, guess_head)
            head_ms = head_call_ms(guess_head, bundle.config.d_model)
        progress.note(f"one row on one thread: early stage passes {', '.join(f'{ms:.2f}' for ms in stage_ms)} ms, "
                      f"a guess classifier call {head_ms:.2f} ms")
        stages = []
        for stage, (confidence, agreed, agreed_full) in enumerate(outcomes):
            report = gate_report(confidence, agreed, choose_threshold(confidence, agreed, cfg.min_precision))
            if report["threshold"] < 1 and not worth_guessing(report, stage, G, stage_ms[stage], head_ms):
                report = gate_report(confidence, agreed, 1.0) | {"not_worth_a_classifier_call": True}
            stages.append(report | {"agreement_full_head": round(float(agreed_full.mean()), 4)})
            progress.note(f"stage {stage}: " + describe_stage(stages[-1]))
        report = {"positions": int(len(outcomes[0][0])), "min_precision": cfg.min_precision,
                  "exits": bundle.exits.get("kind"), "stage_pass_ms": [round(ms, 3) for ms in stage_ms],
                  "vocab_size": vocab_size, "guess_vocabulary": vocab_size if vocabulary is None else len(vocabulary),
                  "classifier_ms": round(head_ms, 3), "stages": stages}
        # a gate that sends no guess needs no guess head, and the bundle stays the size it was
        sends = any(stage["threshold"] < 1 for stage in stages)
        new_files, entries = guess_head_files(bundle, guess_head if sends else None, vocabulary)
        old, kept = bundle.manifest.get("guess_head") or {}, entries["guess_head"] or {}
        update_bundle(bundle, new_files, removed=[old[key] for key in ("graph", "tokens") if old.get(key, kept.get(key))
                                                  != kept.get(key)],
                      guess_gate={"thresholds": [s["threshold"] for s in stages], "report": report}, **entries)
    return report


def write_guess_head(bundle: Bundle, vocabulary: np.ndarray, path: Path) -> None:
    """The classifier over `vocabulary` only: exported from the torch model of a float32 bundle, cut from the
    blocks of a quantized one."""
    if not bundle.quantized:
        from runtime.models.export import export_guess_head  # torch, only where it exports
        from runtime.models.torch_backend import model_from_bundle

        export_guess_head(model_from_bundle(bundle), vocabulary, path)
        return
    try:
        quantized_guess_head(bundle.head_graph, vocabulary, path)
    except ValueError as exc:
        raise SpeedError(f"no guess head can be cut from this bundle's classifier ({exc}); calibrate it with "
                         "--guess-vocabulary 1, its guesses then scoring every token") from None


def guess_head_files(bundle: Bundle, graph: Path | None, vocabulary: np.ndarray | None) -> tuple[dict, dict]:
    """The guess head's files, named by their content (a bundle's files are never overwritten), and its
    manifest entry; none when guesses use the full head."""
    if graph is None:
        return {}, {"guess_head": None}
    digest = sha256_of(graph)[:12]
    names = {"graph": f"guess_head_{digest}.onnx", "tokens": f"guess_tokens_{digest}.bin"}
    files = {names["graph"]: graph.read_bytes(), names["tokens"]: vocabulary.astype("<i8").tobytes()}
    if any(name in bundle.manifest["files"] for name in files):  # calibrated again to the same head
        return {}, {"guess_head": bundle.manifest["guess_head"]}
    return files, {"guess_head": {**names, "size": len(vocabulary)}}
