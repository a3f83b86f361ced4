"""A generation request and its outcome as every layer sees them: the options a caller asks for, why
decoding stopped, the speculation counters, and the one result schema of `speed reference --json` and
`speed generate --json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.core.errors import SpeedError
from runtime.core.sampling import SamplingParams
from runtime.core.stopping import StopReason

if TYPE_CHECKING:
    from runtime.core.scheduler import SequenceState

DEFAULT_MAX_NEW_TOKENS = 64


MAX_WINDOW = 64  # positions stage 0 may run ahead on the ring; more only multiplies the work a flip throws away


@dataclass(frozen=True)
class GenerationOptions:
    """What a request asks of decoding besides its prompt: the same object for the client SDK, the
    command line, single-process decoding and the coordinator."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0
    seed: int = 0  # with the position, fixes every random draw
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    speculative: bool | None = None  # None: the cluster's setting (single process: off)
    ignore_eos: bool = False  # decode max_new_tokens whatever the model says (for benchmarks)
    chat: bool = False  # the prompt is a user's message, rendered with the bundle's chat template
    plain_guesses: bool = False  # guess through the plain head even when the bundle has exits
    guess_threshold: float | None = None  # the confidence gate: None = the cluster's or bundle's, 0 = off
    window: int | None = None  # the ring data path: positions stage 0 runs ahead; None = the cluster's

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # a list is fine to give; keep it immutable
        if self.guess_threshold is not None and not 0 <= self.guess_threshold <= 1:
            raise SpeedError(f"guess threshold must be a probability from 0 (send every guess) to 1 (make none), "
                             f"got {self.guess_threshold}")
        if self.window is not None and not 0 <= self.window <= MAX_WINDOW:
            raise SpeedError(f"the window must be 0 to {MAX_WINDOW} positions ahead of the committed ones, "
                             f"got {self.window}")

    @property
    def sampling(self) -> SamplingParams:
        """Raises SpeedError with a sentence when a sampling setting is out of range."""
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)

    def replace(self, **changes) -> GenerationOptions:
        return dataclasses.replace(self, **changes)


def guess_thresholds(settings: tuple[float | None, ...], bundle: tuple[float, ...], n_stages: int) -> tuple[float, ...]:
    """Per early stage, the probability a guess needs to enter the pipeline: the first setting given
    (a request's, then a cluster's) for every stage, else the bundle's own; () sends every guess."""
    setting = next((s for s in settings if s is not None), None)
    if setting is None:
        return tuple(bundle)
    return (setting,) * (n_stages - 1) if setting > 0 else ()


@dataclass(frozen=True)
class SpeculationStats:
    """How a sequence's ticks went; flip rates are per stage boundary, rounded for reports."""

    ticks: int = 0
    committed: int = 0
    flips_per_boundary: tuple[float, ...] = ()
    flushed_steps: int = 0  # stage-steps of flushed items: work thrown away
    mean_in_flight: float = 0.0
    held_guesses: int = 0  # guesses the confidence gate kept out of flight

    @classmethod
    def of(cls, seq: SequenceState) -> SpeculationStats:
        stats = seq.stats
        return cls(ticks=stats.ticks, committed=len(seq.generated),
                   flips_per_boundary=tuple(round(rate, 4) for rate in stats.flip_rates),
                   flushed_steps=stats.flushed_steps, mean_in_flight=round(stats.mean_in_flight, 3),
                   held_guesses=stats.held_guesses)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "flips_per_boundary": list(self.flips_per_boundary)}

    def describe(self) -> str:
        flips = " ".join(f"{rate:.1%}" for rate in self.flips_per_boundary)
        ticks = f"{self.ticks} ticks, " if self.ticks else ""  # the ring data path has no ticks
        in_flight = f", {self.mean_in_flight:.2f} in flight" if self.ticks else ""
        return (f"{ticks}flips per boundary {flips}, {self.flushed_steps} flushed steps{in_flight}, "
                f"{self.held_guesses} guesses held back")


@dataclass(frozen=True)
class GenerationResult:
    """A finished request, wherever it ran."""

    text: str
    token_ids: list[int]  # generated tokens only; EOS is not included
    stop_reason: StopReason
    prompt_tokens: int
    time_to_first_token_ms: float  # prompt prefill plus the first token
    tokens_per_s: float  # steady decoding: tokens after the first over the time they took
    speculative: bool
    backend: str  # "onnx" or "torch"
    provider: str  # e.g. CPUExecutionProvider
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.token_ids),
            "stop_reason": str(self.stop_reason),
            "time_to_first_token_ms": round(self.time_to_first_token_ms, 2),
            "backend": self.backend,
            "provider": self.provider,
            "speculative": self.speculative,
            "stats": self.stats.to_json(),
        }


def steady_rate(tokens: int, seconds: float) -> float:
    """Tokens per second after the first token: `tokens` in all, the later ones taking `seconds`."""
    return (tokens - 1) / seconds if tokens > 1 and seconds > 0 else 0.0
