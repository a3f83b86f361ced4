"""`speed bench --agreement SOURCE`: how closely a bundle (a quantized copy, say) follows the bundle it
was made from, in greedy tokens over held-out prompts and in loss on held-out text. A measurement, never a
promise: once two greedy texts part, everything after differs, so both the positions before the first
difference and the sequences identical to the end are reported."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from runtime.bench.held_out import agreeing_prefix, held_out_prompts
from runtime.bench.llama_cpp import llama_cpp_greedy_tokens
from runtime.core.bundle import Bundle
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.executor.stage_model import StageModel
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.models.corpus import held_out_windows

# 4,064 tokens: on 8 windows two computations of SmolLM2's fast kind equal but for rounding (attention fused
# or not) were 0.005 nats apart, a quarter of the 0.02 a quantized bundle may lose; on 32, 0.0003
LOSS_WINDOWS, LOSS_WINDOW_TOKENS = 32, 128

def held_out_loss(model: StageModel, windows: list[list[int]]) -> float:
    """Mean next-token cross-entropy in nats, each window read in one pass through every stage."""
    total, count = 0.0, 0
    for ids in windows:
        cache = model.new_cache(rows=model.config.n_stages, capacity=len(ids))
        hidden = model.embed(np.asarray([ids], dtype=np.int64))
        for stage in range(model.config.n_stages):
            hidden = model.run_stage(stage, hidden, cache, slice(stage, stage + 1))
        logits, _ = model.classify(hidden[0, :-1])  # (T - 1, V): position t predicts token t + 1
        peak = logits.max(axis=-1, keepdims=True)
        log_normalizer = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=-1))
        total += float((log_normalizer - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return total / count


def bench_agreement(bundle: Bundle, source: Bundle, *, new_tokens: int = 64, threads: int = 1,
                    llama_cpp: Path | None = None, progress: Progress = NO_PROGRESS) -> dict:
    """llama_cpp: the GGUF file both came from, whose own greedy tokens (llama.cpp's) are compared too."""
    tokenizer = source.tokenizer()
    prompts = [tokenizer.encode(text).ids for text in held_out_prompts(source)]
    models = {"bundle": open_stage_model(bundle, threads=threads), "source": open_stage_model(source, threads=threads)}
    with progress.task("prompts decoded", total=len(prompts) * len(models)):
        tokens = {name: [_greedy(model, prompt, new_tokens, progress) for prompt in prompts]
                  for name, model in models.items()}
    report = {"bundle": bundle.manifest["name"], "source": source.manifest["name"], "prompts": len(prompts),
              "new_tokens": new_tokens, **_agreement(tokens["bundle"], tokens["source"], new_tokens)}
    if llama_cpp is not None:
        progress.note(f"llama.cpp decodes the same prompts from {llama_cpp.name} ...")
        theirs = llama_cpp_greedy_tokens(llama_cpp, prompts, new_tokens, threads=threads)
        report["against_llama_cpp"] = {name: _agreement(ours, theirs, new_tokens) for name, ours in tokens.items()}
    windows = held_out_windows(tokenizer, LOSS_WINDOWS, LOSS_WINDOW_TOKENS)
    loss = {name: round(held_out_loss(model, windows), 4) for name, model in models.items()}
    return {**report, "held_out_loss": {**loss, "windows": len(windows), "tokens_per_window": LOSS_WINDOW_TOKENS}}


def _greedy(model: StageModel, prompt: list[int], new_tokens: int, progress: Progress) -> list[int]:
    tokens = generate_plain(model, prompt, max_new_tokens=new_tokens, eos_id=-1).token_ids
    progress.advance()
    return tokens


def _agreement(ours: list[list[int]], theirs: list[list[int]], new_tokens: int) -> dict:
    """How far each pair of greedy texts goes before they part."""
    agreeing = [agreeing_prefix(a, b) for a, b in zip(ours, theirs)]
    return {"identical_sequences": sum(same == new_tokens for same in agreeing),
            "tokens_before_first_difference": {"mean": round(statistics.mean(agreeing), 1),
                                               "median": statistics.median(agreeing)},
            "agreeing_fraction": round(sum(agreeing) / (new_tokens * len(ours)), 3)}


def format_agreement(report: dict) -> str:
    loss = report["held_out_loss"]
    lines = [f"{report['bundle']} against {report['source']}: greedy, {report['prompts']} held-out prompts x "
             f"{report['new_tokens']} tokens", f"  {_agreement_line(report, report['prompts'])}"]
    for name, agreement in report.get("against_llama_cpp", {}).items():
        lines.append(f"  {name} against llama.cpp's own tokens: {_agreement_line(agreement, report['prompts'])}")
    lines.append(f"  held-out loss, nats a token over {loss['windows']} x {loss['tokens_per_window']} tokens: "
                 f"{loss['bundle']:.4f} against {loss['source']:.4f} ({loss['bundle'] - loss['source']:+.4f})")
    return "\n".join(lines)


def _agreement_line(agreement: dict, prompts: int) -> str:
    before = agreement["tokens_before_first_difference"]
    return (f"identical to the end: {agreement['identical_sequences']} of {prompts}; tokens before the first "
            f"difference: mean {before['mean']}, median {before['median']} ({agreement['agreeing_fraction']:.1%} "
            "of all positions)")
