"""llama.cpp beside a bundle, in one sitting: `speed bench --llama-cpp GGUF`.

llama.cpp runs through llama-cpp-python, installed beside the runtime by whoever measures (it compiles
llama.cpp; never a dependency). Both decode the same prompt token ids greedily for the same number of
tokens with the same threads, prompt by prompt in turn, so the machine's drift reaches both alike. A
rate is steady decoding: the tokens after the first over the time they took, as everywhere in `speed bench`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from runtime.bench.held_out import agreeing_prefix, held_out_prompts
from runtime.core.bundle import Bundle
from runtime.core.errors import SpeedError
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain

SPEED_PROMPTS = 4  # prompts per repeat of the speed comparison
INSTALL = ("llama-cpp-python is not installed here; install it beside the runtime (`pip install llama-cpp-python`, "
           "which compiles llama.cpp in a few minutes) to compare with llama.cpp")


class LlamaCpp:
    """A GGUF file loaded by llama.cpp, decoding greedily from token ids."""

    def __init__(self, gguf: Path, *, threads: int, context: int):
        if not gguf.is_file():
            raise SpeedError(f"{gguf} does not exist; give the GGUF file the bundle was imported from")
        try:
            from llama_cpp import Llama
        except ImportError:
            raise SpeedError(INSTALL) from None
        with _native_stderr_silenced():  # llama.cpp reports its context on stderr even when not verbose
            self._llama = Llama(str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.version = _version()

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """(tokens, seconds to the first token, seconds for the rest); the end-of-text token does not stop it."""
        tokens: list[int] = []
        self._llama.reset()  # else it keeps the cache of a prompt it saw before, and its first token is free
        started = first = time.perf_counter()
        for token in self._llama.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if not tokens:
                first = time.perf_counter()
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
        return tokens, first - started, time.perf_counter() - first


def llama_cpp_greedy_tokens(gguf: Path, prompts: list[list[int]], new_tokens: int, *, threads: int) -> list[list[int]]:
    """llama.cpp's own greedy tokens for each prompt."""
    llama = LlamaCpp(gguf, threads=threads, context=max(map(len, prompts)) + new_tokens)
    return [llama.greedy(prompt, new_tokens)[0] for prompt in prompts]


def bench_llama_cpp(bundle: Bundle, gguf: Path, *, new_tokens: int = 128, repeats: int = 3, threads: int = 1,
                    progress: Progress = NO_PROGRESS) -> dict:
    tokenizer = bundle.tokenizer()
    prompts = [tokenizer.encode(text).ids for text in held_out_prompts(bundle)[:SPEED_PROMPTS]]
    llama = LlamaCpp(gguf, threads=threads, context=max(map(len, prompts)) + new_tokens)
    model = open_stage_model(bundle, threads=threads)
    timings: dict[str, list[tuple[int, float, float]]] = {"speed": [], "llama_cpp": []}
    agreeing: list[int] = []
    with progress.task("prompts decoded by both", total=repeats * len(prompts)):
        for _ in range(repeats):
            for prompt in prompts:
                theirs, first_s, rest_s = llama.greedy(prompt, new_tokens)
                timings["llama_cpp"].append((len(theirs), first_s, rest_s))
                ours = generate_plain(model, prompt, max_new_tokens=new_tokens, eos_id=-1)
                timings["speed"].append((len(ours.token_ids), ours.first_token_s, ours.decode_s))
                agreeing.append(agreeing_prefix(ours.token_ids, theirs))
                progress.advance()
    rates = {side: round(sum(n - 1 for n, _, _ in runs) / sum(rest for _, _, rest in runs), 1)
             for side, runs in timings.items()}
    return {
        "bundle": bundle.manifest["name"],
        "bundle_bytes": sum(meta["bytes"] for meta in bundle.manifest["files"].values()),
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "llama_cpp_version": llama.version,
        "threads": threads,
        "prompts": len(prompts),
        "repeats": repeats,
        "new_tokens": new_tokens,
        "tokens_per_s": rates,
        "speed_over_llama_cpp": round(rates["speed"] / rates["llama_cpp"], 2),
        "first_token_ms": {side: round(1e3 * statistics.median(f for _, f, _ in runs), 1)
                           for side, runs in timings.items()},
        "greedy_tokens_before_first_difference": {"mean": round(statistics.mean(agreeing), 1),
                                                  "median": statistics.median(agreeing)},
    }


def format_llama_cpp(report: dict) -> str:
    rates, first, agree = report["tokens_per_s"], report["first_token_ms"], report["greedy_tokens_before_first_difference"]
    return (f"{report['bundle']} ({report['bundle_bytes'] / 1e6:.1f} MB) against llama.cpp {report['llama_cpp_version']} "
            f"on {report['gguf']} ({report['gguf_bytes'] / 1e6:.1f} MB): greedy, the same {report['prompts']} prompts' "
            f"token ids x {report['new_tokens']} tokens, {report['repeats']} repeat(s), {report['threads']} thread(s)\n"
            f"  tokens/s   speed {rates['speed']:7.1f}   llama.cpp {rates['llama_cpp']:7.1f}   "
            f"speed/llama.cpp {report['speed_over_llama_cpp']:.2f}x\n"
            f"  first token, median ms   speed {first['speed']:.1f}   llama.cpp {first['llama_cpp']:.1f}\n"
            f"  greedy tokens before the first difference: mean {agree['mean']}, median {agree['median']}")


def _version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "unknown")


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points at /dev/null meanwhile: native code writes there past Python's sys.stderr."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
