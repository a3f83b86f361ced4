"""`speed bench`: decoding speed of a bundle in one process.

--reference: plain decoding, ONNX Runtime against torch and short against long contexts.
--local: sequential against speculative decoding, with the flip rates and SPEED's cost model.
Runs alternate between the settings compared and medians are reported, so a slow moment of the
machine does not favour one side.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import numpy as np

from runtime.bench.tally import ModeTally, describe_speculation
from runtime.bench.token_time import describe_token_time, time_per_token
from runtime.core.bundle import Bundle
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.executor.stage_model import StageModel
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.local.speculative import generate_speculative

# Text to build prompts of an exact token count from; any text works, this is what the model knows.
PROMPT_TEXT = (
    "ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
    "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief that thou her "
    "maid art far more fair than she. "
)


def prompt_of(bundle: Bundle, n_tokens: int) -> list[int]:
    ids = bundle.tokenizer().encode(PROMPT_TEXT).ids
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def plain_rate(model: StageModel, prompt: list[int], new_tokens: int, sampling: SamplingParams = GREEDY) -> float:
    # EOS is ignored (-1 matches no token) so every run decodes the same number of tokens
    return generate_plain(model, prompt, max_new_tokens=new_tokens, eos_id=-1, sampling=sampling).tokens_per_s


def alternate(cases: dict[str, tuple[StageModel, list[int]]], new_tokens: int, repeats: int,
              sampling: SamplingParams = GREEDY, progress: Progress = NO_PROGRESS) -> dict[str, float]:
    """Median tokens/s of each case, its runs interleaved with the others'."""
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for model, prompt in cases.values():  # warm-up: first-call allocations and thread start-up
        plain_rate(model, prompt, 4)
    for _ in range(repeats):
        for name, (model, prompt) in cases.items():
            runs[name].append(plain_rate(model, prompt, new_tokens, sampling))
            progress.advance()
    return {name: statistics.median(r) for name, r in runs.items()}


def bench_reference(bundle: Bundle, *, new_tokens: int = 64, repeats: int = 3, threads: int = 1, device: str = "cpu",
                    sampling: SamplingParams = GREEDY, progress: Progress = NO_PROGRESS) -> dict:
    """A quantized bundle has no torch twin, and where torch is not installed (a GPU machine set up for
    serving) there is none to run: the torch figures are then None. device: ONNX Runtime's (torch runs on the
    CPU)."""
    onnx_model = open_stage_model(bundle, backend="onnx", device=device, threads=threads)
    short, long = prompt_of(bundle, 32), prompt_of(bundle, 512)
    cases = {"onnx": (onnx_model, short)}
    if not bundle.quantized and importlib.util.find_spec("torch") is not None:
        cases["torch"] = (open_stage_model(bundle, backend="torch", threads=threads), short)
    with progress.task("runs", total=repeats * (len(cases) + 2 + 2)):  # backends, then 2 contexts, then 2 thread counts
        rates = alternate(cases, new_tokens, repeats, sampling, progress)
        rates |= alternate({"context_32": (onnx_model, short), "context_512": (onnx_model, long)}, new_tokens, repeats,
                           sampling, progress)
        by_threads = {count: onnx_model if count == threads else open_stage_model(bundle, device=device, threads=count)
                      for count in (1, 2)}
        rates |= alternate({f"threads_{count}": (model, short) for count, model in by_threads.items()}, new_tokens,
                           repeats, sampling, progress)
    return {
        "bundle": bundle.manifest["name"],
        "bundle_bytes": sum(meta["bytes"] for meta in bundle.manifest["files"].values()),
        "temperature": sampling.temperature,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": threads,
        "device": device,
        "provider": onnx_model.provider,
        "tokens_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "onnx_over_torch": round(rates["onnx"] / rates["torch"], 2) if "torch" in rates else None,
        "context_512_over_32": round(rates["context_512"] / rates["context_32"], 2),
    }


LOCAL_PROMPTS = (
    "ROMEO. But soft, what light through yonder window breaks?",
    "KING HENRY. Once more unto the breach, dear friends, once more;",
    "Enter a Messenger.",
    "LADY MACBETH. Out, damned spot! out, I say!",
)


def pass_cost_us(model: StageModel, rows: int, capacity: int, repeats: int = 200) -> float:
    """Median time of one stage call over `rows` rows of one new token each."""
    cfg = model.config
    cache = model.new_cache(rows=rows, capacity=capacity)
    cache.lengths[:] = capacity // 2
    hidden = np.random.default_rng(0).normal(size=(rows, 1, cfg.d_model)).astype(np.float32)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.run_stage(0, hidden, cache, slice(0, rows))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def bench_local(bundle: Bundle, *, new_tokens: int = 128, repeats: int = 3, threads: int = 1, device: str = "cpu",
                sampling: SamplingParams = GREEDY, guess_thresholds: tuple[float, ...] = (),
                progress: Progress = NO_PROGRESS) -> dict:
    """Sequential against speculative decoding of the same prompts, one sequence at a time; with
    guess_thresholds, also speculative decoding behind that confidence gate."""
    model = open_stage_model(bundle, backend="onnx", device=device, threads=threads)
    tokenizer = bundle.tokenizer()
    prompts = [tokenizer.encode(p).ids for p in LOCAL_PROMPTS]
    G = bundle.config.n_stages
    gates = {"speculative": (), **({"gated": tuple(guess_thresholds)} if guess_thresholds else {})}
    tallies = {mode: ModeTally() for mode in ("sequential", *gates)}
    generate_speculative(model, [prompts[0]], max_new_tokens=4, eos_id=-1)  # warm-up
    with progress.task("runs", total=repeats * len(prompts) * len(tallies)):
        for _ in range(repeats):
            for prompt in prompts:
                tallies["sequential"].add(generate_plain(model, prompt, max_new_tokens=new_tokens, eos_id=-1,
                                                         sampling=sampling).tokens_per_s)
                progress.advance()
                for mode, thresholds in gates.items():
                    (spec,) = generate_speculative(model, [prompt], max_new_tokens=new_tokens, eos_id=-1,
                                                   sampling=sampling, guess_thresholds=thresholds)
                    tallies[mode].add(spec.tokens_per_s, spec.stats)
                    progress.advance()
    speculation = tallies["speculative"].speculation()
    predicted_steps = 1 + sum((s + 1) * p for s, p in enumerate(speculation["flips_per_boundary"]))
    capacity = max(len(p) for p in prompts) + new_tokens
    spent = {"sequential": time_per_token(lambda: len(generate_plain(model, prompts[0], max_new_tokens=new_tokens,
                                                                     eos_id=-1, sampling=sampling).token_ids)),
             "speculative": time_per_token(lambda: len(generate_speculative(model, [prompts[0]], max_new_tokens=new_tokens,
                                                                            eos_id=-1, sampling=sampling)[0].token_ids))}
    one_row, all_rows = pass_cost_us(model, 1, capacity), pass_cost_us(model, G, capacity)
    sequential, speculative = tallies["sequential"].median, tallies["speculative"].median
    report = {
        "bundle": bundle.manifest["name"],
        "device": device,
        "provider": model.provider,
        "temperature": sampling.temperature,
        "new_tokens": new_tokens,
        "runs": repeats * len(prompts),
        "sequential_tokens_per_s": round(sequential, 1),
        "speculative_tokens_per_s": round(speculative, 1),
        "speedup": round(speculative / sequential, 2),
        **speculation,
        "steps_per_token": {"measured": speculation["ticks_per_token"], "cost_model": round(predicted_steps, 3)},
        "pass_cost_us": {"1_token": round(one_row), f"{G}_tokens": round(all_rows), "ratio": round(all_rows / one_row, 2)},
        "predicted_speedup": round(G * one_row / (predicted_steps * all_rows), 2),
        "time_per_token": spent,
    }
    if "gated" in gates:
        gated = tallies["gated"].median
        report["gated"] = {"guess_thresholds": list(gates["gated"]), "tokens_per_s": round(gated, 1),
                           "speedup": round(gated / sequential, 2), **tallies["gated"].speculation()}
    return report


def sampled(temperature: float) -> str:
    return f"sampled at temperature {temperature:g}" if temperature else "greedy"


def format_local(report: dict) -> str:
    steps, cost = report["steps_per_token"], report["pass_cost_us"]
    lines = [
        f"sequential vs speculative decoding of {report['bundle']} on {report['provider']}, "
        f"{report['new_tokens']} new tokens, "
        f"{sampled(report['temperature'])}, median of {report['runs']} alternating runs",
        f"  sequential  {report['sequential_tokens_per_s']:8.1f} tokens/s",
        f"  speculative {report['speculative_tokens_per_s']:8.1f} tokens/s   speedup {report['speedup']:.2f}x; "
        + describe_speculation(report),
    ]
    if "gated" in report:
        gated = report["gated"]
        thresholds = " ".join(f"{t:g}" for t in gated["guess_thresholds"])
        lines.append(f"  gated       {gated['tokens_per_s']:8.1f} tokens/s   speedup {gated['speedup']:.2f}x; "
                     f"{describe_speculation(gated)} (thresholds {thresholds})")
    lines += [f"  passes per token {steps['measured']} measured, {steps['cost_model']} by the cost model; one stage "
              "pass: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in cost.items())
              + f" -> predicted speedup {report['predicted_speedup']:.2f}x"]
    lines += ["  " + describe_token_time(mode, spent) for mode, spent in report["time_per_token"].items()]
    return "\n".join(lines)
