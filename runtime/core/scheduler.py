"""SPEED's schedule as a pure state machine: `plan()` a tick, run it elsewhere, `apply()` the results.

The one rule: every in-flight item advances one stage per tick, and after each tick the oldest item
whose newest prediction differs from the token its successor was started with flushes every younger
item; the corrected prediction re-enters stage 0 as the successor at the next tick. The newest item's
prediction is the guess that enters stage 0 next. An item leaving the last stage commits its
prediction, so the committed text is exactly what plain decoding gives.

A confidence gate holds a guess back when the stage that made it was unsure (its probability below the
sequence's threshold for that boundary): the successor then waits for a later stage's confident guess or
for the committed token, as without speculation. Only timing changes, never the text.

An item is a run of consecutive positions of one sequence at one stage: prompt chunks (prefill) and
single decode tokens move through the same pipeline, so the first decode token enters stage 0 one tick
after stage 0 has seen the prompt's last position. No I/O and no tensors here: the executor keeps each
item's hidden state between ticks, keyed by (sequence, start).

A rewind (after lost caches) is a flush at position 0: every stage's cache is cut to nothing and the
prompt plus every committed token is fed again as prefill, grouped as plain decoding groups them (the
prompt in chunks, every later position alone: runtime/core/grouping.py); since a token
depends only on the positions before it, computed the same way (and a sampled draw on its seed and
position), decoding then goes on with the same text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from runtime.core.grouping import PREFILL_CHUNK, pass_end
from runtime.core.stopping import StopReason


@dataclass(frozen=True)
class Item:
    seq_id: int
    start: int  # first position
    length: int  # positions [start, start + length)
    stage: int  # the stage it runs this tick
    tokens: tuple[int, ...] | None  # input tokens at stage 0; None later (the executor holds the hidden state)
    final: bool  # True when its prediction after this stage commits a token (the last stage)
    predict: bool = True  # False: nothing reads its prediction (an early stage without speculation)


@dataclass(frozen=True)
class Truncate:
    """Drop every KV entry of `stage` at positions >= `length` (they belong to flushed items)."""

    seq_id: int
    stage: int
    length: int


@dataclass(frozen=True)
class TickPlan:
    truncations: list[Truncate]  # apply before running the items
    items: list[Item]
    finished: list[int]  # sequences that ended last tick: the executor may free their caches


@dataclass
class SequenceStats:
    ticks: int = 0
    item_steps: int = 0  # items run, summed over ticks
    flushed_steps: int = 0  # stage-steps of flushed items: work thrown away
    flips: list[int] = field(default_factory=list)  # per stage boundary
    checks: list[int] = field(default_factory=list)  # predictions compared at each boundary
    held_guesses: int = 0  # guesses the confidence gate kept out of flight

    @property
    def flip_rates(self) -> list[float]:
        return [f / c if c else 0.0 for f, c in zip(self.flips, self.checks)]

    @property
    def mean_in_flight(self) -> float:
        return self.item_steps / self.ticks if self.ticks else 0.0


@dataclass
class _Flight:
    start: int
    length: int
    next_stage: int
    tokens: tuple[int, ...]
    prediction: int | None = None  # newest prediction for position start + length
    predicted_at: int = -1  # the stage that made it

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class SequenceState:
    seq_id: int
    prompt: list[int]
    max_new_tokens: int
    last_position: int  # highest position an item may occupy (bounded by max new tokens and the context)
    speculate: bool
    guess_thresholds: tuple[float, ...]  # per early stage: a guess below it stays out of flight (0: always sent)
    eos_id: int | None
    should_stop: Callable[[list[int]], bool] | None  # given the generated tokens, e.g. a stop string
    prefill: list[int] = field(default_factory=list)  # fed before decoding: the prompt (+ committed tokens after a rewind)
    generated: list[int] = field(default_factory=list)
    flights: list[_Flight] = field(default_factory=list)  # oldest first
    next_prompt_position: int = 0
    stop_reason: StopReason | None = None
    stats: SequenceStats = field(default_factory=SequenceStats)

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def commit(self, token: int) -> bool:
        """Append a final token; True when the sequence ends with it."""
        if token == self.eos_id:
            self.stop_reason = StopReason.EOS
            return True
        self.generated.append(token)
        if self.should_stop is not None and self.should_stop(self.generated):
            self.stop_reason = StopReason.STOP
        elif len(self.generated) == self.max_new_tokens:
            self.stop_reason = StopReason.LENGTH
        return self.done

    def end_if_complete(self) -> bool:
        """Whether a resumed sequence's committed tokens already end it (the end was lost on the way)."""
        if self.should_stop is not None and self.should_stop(self.generated):
            self.stop_reason = StopReason.STOP
        elif len(self.generated) >= self.max_new_tokens:
            self.stop_reason = StopReason.LENGTH
        elif len(self.prefill) > self.last_position + 1:
            self.stop_reason = StopReason.CONTEXT
        return self.done


def new_sequence(seq_id: int, prompt: list[int], *, n_stages: int, max_new_tokens: int, context_length: int,
                 speculate: bool = True, guess_thresholds: tuple[float, ...] = (), eos_id: int | None = None,
                 should_stop: Callable[[list[int]], bool] | None = None,
                 generated: list[int] | None = None) -> SequenceState:
    """generated: tokens already committed (a resumed request); decoding continues after them.
    guess_thresholds: per early stage, the confidence a guess needs to be sent; () sends every guess."""
    if not prompt or len(prompt) >= context_length or max_new_tokens < 1:
        raise ValueError("the prompt must be non-empty and shorter than the context, max_new_tokens >= 1")
    if guess_thresholds and len(guess_thresholds) != n_stages - 1:
        raise ValueError(f"guess_thresholds needs one value per early stage ({n_stages - 1})")
    seq = SequenceState(
        seq_id=seq_id, prompt=list(prompt), max_new_tokens=max_new_tokens, speculate=speculate,
        guess_thresholds=tuple(guess_thresholds), eos_id=eos_id,
        should_stop=should_stop, last_position=min(context_length, len(prompt) + max_new_tokens - 1) - 1,
        generated=list(generated or []),
    )
    seq.prefill = seq.prompt + seq.generated
    seq.stats.flips = [0] * (n_stages - 1)
    seq.stats.checks = [0] * (n_stages - 1)
    if seq.generated:
        seq.end_if_complete()
    return seq


class SpeedScheduler:
    def __init__(self, n_stages: int, *, prefill_chunk: int = PREFILL_CHUNK):
        if n_stages < 1 or prefill_chunk < 1:
            raise ValueError("n_stages and prefill_chunk must be at least 1")
        self.n_stages = n_stages
        self.prefill_chunk = prefill_chunk
        self.sequences: dict[int, SequenceState] = {}
        self._truncations: list[Truncate] = []
        self._finished: list[int] = []

    def add(self, seq_id: int, prompt: list[int], **options) -> SequenceState:
        """options: those of new_sequence."""
        if seq_id in self.sequences:
            raise ValueError(f"sequence {seq_id} already exists")
        seq = self.sequences[seq_id] = new_sequence(seq_id, prompt, n_stages=self.n_stages, **options)
        if seq.done:
            self._finished.append(seq.seq_id)
        else:
            self._enter_prompt_chunk(seq)
        return seq

    def rewind(self, seq_id: int) -> None:
        """Forget every cache entry and in-flight item of a sequence: all stages start again at position 0
        with the prompt and the committed tokens as prefill (the caches were lost, or moved elsewhere)."""
        seq = self.sequences[seq_id]
        if seq.done:
            return
        seq.stats.flushed_steps += sum(f.next_stage for f in seq.flights)
        seq.flights = []
        seq.prefill = seq.prompt + seq.generated
        seq.next_prompt_position = 0
        self._truncations = [cut for cut in self._truncations if cut.seq_id != seq_id]
        self._truncations.extend(Truncate(seq_id, stage, 0) for stage in range(self.n_stages))
        self._enter_prompt_chunk(seq)

    @property
    def active(self) -> bool:
        return any(not s.done for s in self.sequences.values())

    def plan(self) -> TickPlan:
        items = []
        for seq in self.sequences.values():
            if seq.done:
                continue
            seq.stats.ticks += 1
            seq.stats.item_steps += len(seq.flights)
            for f in seq.flights:
                final = f.next_stage == self.n_stages - 1
                items.append(Item(seq.seq_id, f.start, f.length, f.next_stage, f.tokens if f.next_stage == 0 else None,
                                  final=final, predict=final or self._guesses(seq, f.next_stage)))
        plan = TickPlan(self._truncations, items, self._finished)
        self._truncations, self._finished = [], []
        return plan

    def apply(self, predictions: Mapping[tuple[int, int], int],
              confidence: Mapping[tuple[int, int], float] | None = None) -> None:
        """predictions[(seq_id, start)]: each planned item's prediction for the position after it
        (a guess at early stages; at the last stage the token to commit, greedy or sampled); items
        planned with predict=False may be left out. confidence[(seq_id, start)]: the probability the
        stage gave its guess, read by the gate; a guess without one counts as sure."""
        for seq in self.sequences.values():
            if not seq.done:
                self._apply_sequence(seq, predictions, confidence or {})

    def _apply_sequence(self, seq: SequenceState, predictions: Mapping[tuple[int, int], int],
                        confidence: Mapping[tuple[int, int], float]) -> None:
        last = self.n_stages - 1
        for index, f in enumerate(seq.flights):
            stage = f.next_stage
            f.next_stage += 1
            if f.end < len(seq.prefill):
                continue  # a prefill chunk whose successor is the prefill itself: nothing to check
            prediction = predictions.get((seq.seq_id, f.start))
            if prediction is None:  # a stage that makes no guess: the next one checks and guesses
                continue
            if f.prediction is not None and f.predicted_at == stage - 1:
                seq.stats.checks[stage - 1] += 1
                seq.stats.flips[stage - 1] += prediction != f.prediction
            f.prediction, f.predicted_at = prediction, stage
            if stage == last and seq.commit(prediction):
                self._drop_after(seq, index)
                break
            successor = seq.flights[index + 1] if index + 1 < len(seq.flights) else None
            if successor is not None and successor.tokens[0] != prediction:
                self._drop_after(seq, index)
                successor = None
            if successor is None:
                if self._may_enter(seq, f) and self._sure(seq, stage, confidence.get((seq.seq_id, f.start), 1.0)):
                    seq.flights.append(_Flight(f.end, 1, 0, (prediction,)))
                break
        seq.flights = [f for f in seq.flights if f.next_stage <= last]
        if not seq.done:
            self._enter_prompt_chunk(seq)
            if not seq.flights:
                seq.stop_reason = StopReason.CONTEXT
        if seq.done:
            self._finished.append(seq.seq_id)

    def _may_enter(self, seq: SequenceState, f: _Flight) -> bool:
        """Whether the successor of `f` may start now: a guess needs speculation, or `f` must be final."""
        if seq.done or f.end > seq.last_position:
            return False
        return seq.speculate or f.next_stage == self.n_stages

    @staticmethod
    def _guesses(seq: SequenceState, stage: int) -> bool:
        """Whether an early stage guesses at all: with speculation, unless its gate holds every guess
        (threshold 1), in which case nobody reads its prediction and the classifier need not run."""
        return seq.speculate and not (seq.guess_thresholds and seq.guess_thresholds[stage] >= 1)

    def _sure(self, seq: SequenceState, stage: int, confidence: float) -> bool:
        """Whether the gate lets a guess made after `stage` into flight; a committed token always enters."""
        if stage == self.n_stages - 1 or not seq.guess_thresholds or confidence >= seq.guess_thresholds[stage]:
            return True
        seq.stats.held_guesses += 1
        return False

    def _drop_after(self, seq: SequenceState, index: int) -> None:
        """Flush every flight younger than flights[index] and roll back its KV writes.

        Younger flights have not been advanced yet this tick, but they ran: stage next_stage included.
        """
        dropped = seq.flights[index + 1 :]
        if not dropped:
            return
        del seq.flights[index + 1 :]
        passed = max(f.next_stage for f in dropped) + 1  # stages holding entries of flushed positions
        seq.stats.flushed_steps += sum(f.next_stage + 1 for f in dropped)
        self._truncations.extend(Truncate(seq.seq_id, s, dropped[0].start) for s in range(passed))

    def _enter_prompt_chunk(self, seq: SequenceState) -> None:
        """Feed the next prefill chunk to stage 0 when stage 0 is free."""
        if seq.next_prompt_position >= len(seq.prefill) or any(f.next_stage == 0 for f in seq.flights):
            return
        start = seq.next_prompt_position
        end = pass_end(start, len(seq.prompt), self.prefill_chunk)
        seq.flights.append(_Flight(start, end - start, 0, tuple(seq.prefill[start:end])))
        seq.next_prompt_position = end

    def remove(self, seq_id: int) -> SequenceState:
        """Forget a sequence, with anything still pending for it: its caches are freed elsewhere."""
        self._truncations = [cut for cut in self._truncations if cut.seq_id != seq_id]
        self._finished = [finished for finished in self._finished if finished != seq_id]
        return self.sequences.pop(seq_id)
