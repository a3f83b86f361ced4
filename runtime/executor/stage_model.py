"""What decoders need of a model, whatever runs it: ONNX Runtime on a node (runtime.executor.onnx_stage_model) or
torch eager in one process (runtime.models.torch_backend)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from runtime.core.bundle import ExitMap
from runtime.core.config import ModelConfig
from runtime.executor.kv_cache import KVCache


@dataclass(frozen=True)
class KeptRows:
    """Hidden states kept on the device (runtime.executor.kept_states): the latest outputs of these rows of a cache,
    one (1, d) state a row. Where a model keeps states, its decode calls leave their outputs so and its next calls
    and classifiers read them there; anything else reads them with read_kept. A classifier's rows may mix them with
    states the host gives: a row FROM_HIDDEN is `given`'s row, (N, d)."""

    cache: KVCache
    rows: tuple[int, ...]
    given: np.ndarray | None = None

    def __len__(self) -> int:  # as an array of the states: one a row
        return len(self.rows)


class TopLogits(NamedTuple):
    """A classifier call's answer where its logits stay where it computed them."""

    logits: np.ndarray  # (N, count) each row's largest logits, largest first,
    tokens: np.ndarray  # (N, count) their tokens (with guesses: indices into guess_vocabulary)
    totals: np.ndarray  # (N,) sum(exp((logits - max) * inverse temperature)) over each row's every logit
    greedy: np.ndarray  # (N,) each row's most likely token
    size: int  # logits a row
    fetch_all: Callable[[], np.ndarray]  # (N, size) every logit, brought to the host when called


class StageModel(Protocol):
    """Embedding lookup, the stages and the shared classifier of one bundle."""

    config: ModelConfig
    provider: str
    exit_maps: dict[int, ExitMap]  # early stage -> its low-rank or affine exit, which guesses read the head through
    exit_layer_stages: frozenset[int]  # early stages with a one-layer exit (run_exit_layer)
    guess_vocabulary: np.ndarray | None  # (K,) token ids that classify_guesses scores; None: all of them

    def embed(self, token_ids: np.ndarray) -> np.ndarray: ...  # (B, T) int64 -> (B, T, d)

    def graph_of(self, stage: int) -> int: ...

    # a cache these graphs can run with (on the device that runs them)
    def new_cache(self, *, rows: int, capacity: int, layers: int | None = None) -> KVCache: ...

    # hidden (B, T, d) -> (B, T, d); writes each row's new keys and values at its length, which stays as it is
    def run_stage(self, stage: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray: ...

    def run_exit_layer(self, stage: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray: ...

    # whether a decode call (one new token a row) may take its inputs from states kept on the device and leave its
    # outputs there (run_kept), and classifiers read them there (a KeptRows for `hidden`): a GPU's
    keeps_states: bool

    # one new token a row of `rows`, each row's input where sources (B,) says (runtime.executor.kept_states): a kept
    # state of the cache, the embedding of tokens[i] (B,), or hidden[i] (B, 1, d); the outputs stay, as KeptRows of
    # these rows. Only where keeps_states
    def run_kept(self, stage: int, cache: KVCache, rows: slice, sources: np.ndarray, tokens: np.ndarray,
                 hidden: np.ndarray | None) -> None: ...

    def read_kept(self, kept: KeptRows) -> np.ndarray: ...  # -> (len(rows), 1, d) on the host

    def classify(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...  # (N, d) -> logits, tokens

    # (N, d) -> logits over guess_vocabulary, greedy indices into it: a cheaper head for guesses
    def classify_guesses(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    # (N, d) -> greedy tokens (with guesses: indices into guess_vocabulary) and their probabilities, (N,) each,
    # where `scored` (N,) bool asks (elsewhere they may be NaN): all that greedy decoding needs, so the logits
    # may stay where they were computed
    def classify_greedy(self, hidden: np.ndarray | KeptRows, scored: np.ndarray, *, guesses: bool = False
                        ) -> tuple[np.ndarray, np.ndarray]: ...

    # whether its logits stay where they were computed (a GPU's): a draw then asks classify_top
    keeps_logits: bool

    # (N, d), inverse temperatures (N,) -> each row's `count` largest logits and what else a draw needs
    def classify_top(self, hidden: np.ndarray | KeptRows, inverse_temperature: np.ndarray, count: int, *,
                     guesses: bool = False) -> TopLogits: ...


def top_probabilities(logits: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Logits (N, V) -> where `scored`, the probability of the row's most likely token (NaN elsewhere), (N,)."""
    probabilities = np.full(len(logits), np.nan, dtype=np.float32)
    rows = logits[scored]
    probabilities[scored] = 1 / np.exp(rows - rows.max(axis=-1, keepdims=True)).sum(axis=-1)
    return probabilities
