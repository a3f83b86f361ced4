"""`speed bench --reference`: plain decoding speed of a bundle, ONNX Runtime against torch and
short against long contexts. Runs alternate between the settings compared, and the median of
several repeats is reported, so a slow moment of the machine does not favour one side.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from runtime.bundle import Bundle
from runtime.reference import StageModel, generate_plain, open_stage_model

# Text to build prompts of an exact token count from; any text works, this is what the model knows.
PROMPT_TEXT = (
    "ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
    "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief that thou her "
    "maid art far more fair than she. "
)


@dataclass(frozen=True)
class Measurement:
    name: str
    tokens_per_s: float  # median over repeats
    runs: list[float]


def prompt_of(bundle: Bundle, n_tokens: int) -> list[int]:
    ids = bundle.tokenizer().encode(PROMPT_TEXT).ids
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def decode_rate(model: StageModel, prompt: list[int], new_tokens: int) -> float:
    # EOS is ignored (-1 matches no token) so every run decodes the same number of tokens
    return generate_plain(model, prompt, max_new_tokens=new_tokens, eos_id=-1).tokens_per_s


def alternate(cases: dict[str, tuple[StageModel, list[int]]], new_tokens: int, repeats: int) -> list[Measurement]:
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for model, prompt in cases.values():  # warm-up: first-call allocations and thread start-up
        decode_rate(model, prompt, 4)
    for _ in range(repeats):
        for name, (model, prompt) in cases.items():
            runs[name].append(decode_rate(model, prompt, new_tokens))
    return [Measurement(name, statistics.median(r), r) for name, r in runs.items()]


def bench_reference(bundle: Bundle, *, new_tokens: int = 64, repeats: int = 3, threads: int = 0) -> dict:
    onnx_model = open_stage_model(bundle, backend="onnx", threads=threads)
    torch_model = open_stage_model(bundle, backend="torch", threads=threads)
    short, long = prompt_of(bundle, 32), prompt_of(bundle, 512)
    backends = alternate({"onnx": (onnx_model, short), "torch": (torch_model, short)}, new_tokens, repeats)
    contexts = alternate({"context_32": (onnx_model, short), "context_512": (onnx_model, long)}, new_tokens, repeats)
    by_name = {m.name: m for m in backends + contexts}
    return {
        "bundle": bundle.manifest["name"],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "tokens_per_s": {name: round(m.tokens_per_s, 1) for name, m in by_name.items()},
        "onnx_over_torch": round(by_name["onnx"].tokens_per_s / by_name["torch"].tokens_per_s, 2),
        "context_512_over_32": round(by_name["context_512"].tokens_per_s / by_name["context_32"].tokens_per_s, 2),
    }
