"""The ring data path as a pure state machine per node: positions flow from node to node, the first
stage runs ahead on its own guesses, and mispredictions are settled between nodes.

The node hosting stage 0 (the head) owns each sequence's timeline: the prefill (prompt and tokens
committed before), then one token per position, guessed or committed. It runs stage 0 position after
position and feeds its own guess for the next position straight back in, up to `window` positions
beyond the last committed one (0: wait for every committed token, which is sequential decoding), and
only while it is sure enough of them: it pauses after a guess it gives less than `run_ahead` of
probability, until that position is committed or corrected, since a wrong guess throws away every pass
run after it. (The shell sets run_ahead from what it measures: running on a guess is worth its pass
when the wait it is expected to save, the time a commit takes to come back, outweighs the pass it is
expected to waste.) Each
stage hands its positions to the next stage as a `Hop`. A stage that predicts a position (every stage
of a speculating sequence, unless its gate makes no guesses) checks the token each hop brings against
its own prediction for it; on a difference it sends the head a `Correction` and drops the rest of that
timeline. The last stage commits its prediction for the position after each hop (`Commit`, to the
head and the coordinator): that is the text, exactly what sequential decoding gives.

Every fork of the timeline (a correction or a commit that differs from the guess) starts a new
generation at the forked position. Links are first-in first-out and every stage passes hops on in the
order it ran them, so each stage sees a sequence's generations in increasing order; the first hop of a
newer generation starts where that generation forked, and the stage cuts its cache there. A stage that
found a wrong token drops every later hop of that generation, and the head ignores a correction whose
position a newer fork already re-decided, so stale work in flight dies wherever it arrives.

No I/O, no tensors: the node's shell runs the `Run`s this machine hands out (one at a time per
sequence and stage, its cache first cut to the run's start), carries hidden states beside the hops
and delivers the messages in `outbox`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runtime.core.grouping import PREFILL_CHUNK, pass_end

KEPT_PREDICTIONS = 64  # a stage's predictions kept for checking hops of a later generation (forks are recent)
MAX_EARLY = 1024  # messages kept for sequences whose open has not arrived yet (it travels on another link)


class RingError(Exception):
    """A message broke the ring's invariants: a bug, or a sender that is not following the protocol."""


@dataclass(frozen=True)
class Hop:
    """Positions [start, start + len(tokens)) of one generation that passed stage - 1, for `stage`."""

    seq_id: int
    gen: int
    stage: int
    start: int
    tokens: tuple[int, ...]  # the input token of each position
    committed: int  # positions before this one were final when stage 0 ran them: nobody second-guesses them
    payload: object = field(default=None, compare=False, repr=False)  # the shell's: the hidden states


@dataclass(frozen=True)
class Correction:
    """For the head: in generation `gen`, stage `found_at` predicts `token` at `position`, not the guess."""

    seq_id: int
    gen: int
    position: int
    token: int
    found_at: int


@dataclass(frozen=True)
class Commit:
    """From the last stage: `token` is final at `position`. Commits of a sequence come in position order."""

    seq_id: int
    position: int
    token: int


@dataclass(frozen=True)
class Run:
    """Run `stage` over positions [start, start + len(tokens)), its cache cut to `start` first."""

    seq_id: int
    gen: int
    stage: int
    start: int
    tokens: tuple[int, ...]
    predict: bool  # whether anything reads the prediction for the position after the run
    final: bool  # the last stage: the prediction is the token to commit
    committed: int  # as the hop that brought it: positions before this are final
    payload: object = field(default=None, compare=False, repr=False)  # the hop's, for the shell

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


Message = Hop | Correction | Commit


@dataclass
class StageCounts:
    runs: int = 0  # runs handed out
    positions: int = 0  # positions they covered
    checks: int = 0  # hops checked against this stage's own prediction
    flips: int = 0  # of those, found wrong
    dropped: int = 0  # hops dropped as stale (an older generation)


@dataclass
class _Stage:
    """One hosted stage of one sequence."""

    predict: bool
    gen: int = 0  # the newest generation seen
    dead_below: int = 0  # hops of older generations are stale
    length: int = 0  # cache entries once the runs handed out are done
    busy: bool = False  # a run is out
    predictions: dict[int, int] = field(default_factory=dict)  # position -> this stage's prediction for it
    inbox: deque[Hop] = field(default_factory=deque)
    committed: int = 0  # the last stage: positions whose token is final (the prefill included)
    counts: StageCounts = field(default_factory=StageCounts)


@dataclass
class _Head:
    """A sequence's timeline at the node hosting stage 0."""

    tokens: list[int]  # prefill, then one token per decoded position (guessed or committed)
    committed: int  # positions whose token is final (the prefill included)
    prompt_length: int  # the prefill's first positions, the only ones run several in one pass
    window: int  # positions stage 0 may run beyond the committed ones
    threshold: float  # stage 0's guess goes in only with at least this probability
    last_position: int
    gen: int = 0
    emitted: int = 0  # positions handed to stage 0 in this generation's timeline
    busy: bool = False  # a stage 0 run is out
    forks: list[tuple[int, int]] = field(default_factory=list)  # (generation, position it forked at)
    sure: dict[int, float] = field(default_factory=dict)  # guessed position -> stage 0's probability of its guess
    counts: StageCounts = field(default_factory=StageCounts)  # stage 0's
    held_guesses: int = 0
    corrections: int = 0  # applied
    stale_corrections: int = 0


@dataclass
class _Sequence:
    stages: dict[int, _Stage]
    head: _Head | None


class RingMachine:
    def __init__(self, stages: tuple[int, ...], n_stages: int, *, prefill_chunk: int = PREFILL_CHUNK,
                 run_ahead: float = 0.0):
        """run_ahead: stage 0 runs on no guess it gives less probability than this until the guess is
        committed or corrected (0: always up to the window); the shell may change it."""
        if not stages or any(not 0 <= s < n_stages for s in stages) or prefill_chunk < 1 or not 0 <= run_ahead <= 1:
            raise ValueError("a ring node hosts at least one of the model's stages; prefill_chunk >= 1; "
                             "0 <= run_ahead <= 1")
        self.stages = tuple(sorted(set(stages)))
        self.n_stages = n_stages
        self.prefill_chunk = prefill_chunk
        self.run_ahead = run_ahead
        self.sequences: dict[int, _Sequence] = {}
        self.outbox: list[Message] = []
        # The coordinator opens a sequence on every node at once, but a node may hear from the node before
        # it first: what comes for a sequence newer than any opened here waits for its open. (Sequence ids
        # grow with admission, so an unknown id at or below the newest opened one was closed already.)
        self._newest_opened = -1
        self._early: dict[int, list[Message]] = {}

    def open(self, seq_id: int, prefill: list[int], *, last_position: int, window: int = 0,
             guess_thresholds: tuple[float, ...] = (), prompt_length: int | None = None) -> None:
        """prefill: the prompt (its first prompt_length tokens; None: all) and any tokens committed before
        (after a failover or a resumed request);
        decoding goes on at position len(prefill). last_position: the highest position a run may reach.
        window: positions stage 0 runs ahead on guesses (0: sequential decoding). guess_thresholds: per
        early stage, the probability a guess needs (1: the stage makes none)."""
        if seq_id in self.sequences:
            raise RingError(f"sequence {seq_id} is already open")
        if not prefill or last_position < len(prefill) - 1 or window < 0:
            raise RingError("a sequence needs a prefill, a last position at or after it and a window >= 0")
        prompt_length = len(prefill) if prompt_length is None else prompt_length
        if not 0 < prompt_length <= len(prefill):
            raise RingError(f"a prompt of {prompt_length} tokens does not fit a prefill of {len(prefill)}")
        if guess_thresholds and len(guess_thresholds) != self.n_stages - 1:
            raise RingError(f"guess_thresholds needs one value per early stage ({self.n_stages - 1})")
        thresholds = guess_thresholds or (0.0,) * (self.n_stages - 1)
        last = self.n_stages - 1
        stages = {stage: _Stage(predict=stage == last or (window > 0 and thresholds[stage] < 1),
                                committed=len(prefill))
                  for stage in self.stages if stage > 0}
        head = None
        if 0 in self.stages:
            head = _Head(tokens=list(prefill), committed=len(prefill), prompt_length=prompt_length,
                         window=window if last else 0,
                         threshold=thresholds[0] if last else 1.0, last_position=last_position)
        self.sequences[seq_id] = _Sequence(stages=stages, head=head)
        self._newest_opened = max(self._newest_opened, seq_id)
        for message in self._early.pop(seq_id, []):
            self.receive(message)
        self._early = {early: kept for early, kept in self._early.items() if early > self._newest_opened}

    def close(self, seq_id: int) -> None:
        self.sequences.pop(seq_id, None)

    def counts(self, seq_id: int) -> tuple[dict[int, StageCounts], int]:
        """Per hosted stage what it ran, checked and dropped, and the guesses stage 0 held back."""
        seq = self.sequences[seq_id]
        counts = {index: stage.counts for index, stage in seq.stages.items()}
        if seq.head is None:
            return counts, 0
        return {0: seq.head.counts, **counts}, seq.head.held_guesses

    def drain(self) -> list[Message]:
        out, self.outbox = self.outbox, []
        return out

    # --- messages in ---------------------------------------------------------------------------

    def receive(self, message: Message) -> None:
        """A message for this node; one for a sequence it does not hold is kept until the sequence opens
        when it is newer than any opened here (at most MAX_EARLY such messages), else dropped (closed)."""
        seq = self.sequences.get(message.seq_id)
        if seq is None:
            if message.seq_id > self._newest_opened and sum(map(len, self._early.values())) < MAX_EARLY:
                self._early.setdefault(message.seq_id, []).append(message)
            return
        if isinstance(message, Hop):
            if message.stage not in seq.stages:
                raise RingError(f"a hop for stage {message.stage} reached a node hosting stages {list(self.stages)}")
            seq.stages[message.stage].inbox.append(message)
        elif seq.head is None:
            raise RingError(f"a {type(message).__name__.lower()} reached a node that does not host stage 0")
        elif isinstance(message, Commit):
            self._commit(seq.head, message)
        else:
            self._correct(seq.head, message)

    def _commit(self, head: _Head, commit: Commit) -> None:
        if commit.position < head.committed:
            return  # already known: the node was told again after a restart of the stream
        if commit.position != head.committed or commit.position > len(head.tokens):
            raise RingError(f"sequence {commit.seq_id}: a commit at position {commit.position} while "
                            f"{head.committed} positions are final and {len(head.tokens)} known")
        head.committed += 1
        head.sure.pop(commit.position, None)
        if commit.position == len(head.tokens):
            head.tokens.append(commit.token)  # the guess was held back, or never made
        elif head.tokens[commit.position] != commit.token:
            self._fork(head, commit.position, commit.token)

    def _correct(self, head: _Head, correction: Correction) -> None:
        """The sender dropped the rest of its generation, so unless a newer fork re-decided the position
        already, the timeline forks there: with the sender's token, or with the committed one again when
        the position is final (the sender's stage was wrong and the guess right)."""
        p = correction.position
        if p >= len(head.tokens) or any(gen > correction.gen and at <= p for gen, at in head.forks):
            head.stale_corrections += 1
            return
        head.corrections += 1
        self._fork(head, p, head.tokens[p] if p < head.committed else correction.token)

    @staticmethod
    def _fork(head: _Head, position: int, token: int) -> None:
        """A new generation from `position` on, with `token` there; committed tokens after it are final
        and stay (a fork below them sends them again), guesses after it go."""
        head.gen += 1
        head.forks = [(gen, at) for gen, at in head.forks if at >= head.committed] + [(head.gen, position)]
        del head.tokens[max(position + 1, head.committed):]
        head.tokens[position] = token
        head.sure = {p: sure for p, sure in head.sure.items() if p < position}  # a later stage's token is not a guess
        head.emitted = min(head.emitted, position)

    # --- runs ----------------------------------------------------------------------------------

    def take_runs(self) -> list[Run]:
        """At most one run per sequence and hosted stage, for the stages that are free and have work."""
        runs = []
        for seq_id, seq in self.sequences.items():
            if seq.head is not None and not seq.head.busy:
                run = self._head_run(seq_id, seq.head)
                if run is not None:
                    runs.append(run)
            for stage_index, stage in seq.stages.items():
                if not stage.busy:
                    run = self._stage_run(seq_id, seq, stage_index, stage)
                    if run is not None:
                        runs.append(run)
        return runs

    def _head_run(self, seq_id: int, head: _Head) -> Run | None:
        start = head.emitted
        if start >= len(head.tokens) or start >= head.committed + head.window or start > head.last_position:
            return None
        if start > head.committed and not self._likely(head, start):
            return None
        end = min(pass_end(start, head.prompt_length, self.prefill_chunk), head.last_position + 1)
        head.emitted, head.busy = end, True
        head.counts.runs += 1
        head.counts.positions += end - start
        last = self.n_stages == 1
        return Run(seq_id, head.gen, 0, start, tuple(head.tokens[start:end]),
                   predict=last or head.window > 0 and head.threshold < 1, final=last, committed=head.committed)

    def _likely(self, head: _Head, position: int) -> bool:
        """Whether every guess in flight up to `position` has at least the run_ahead probability."""
        return all(head.sure.get(p, 1.0) >= self.run_ahead for p in range(head.committed, position + 1))

    def _stage_run(self, seq_id: int, seq: _Sequence, index: int, stage: _Stage) -> Run | None:
        while stage.inbox:
            hop = stage.inbox.popleft()
            # older than what this stage saw, or a timeline that keeps a token this stage rejected (it
            # forked after that position, so it skips positions this stage never ran)
            if hop.gen < stage.dead_below or hop.gen < stage.gen or hop.start > stage.length:
                stage.counts.dropped += 1
                continue
            if hop.gen > stage.gen:
                stage.gen = hop.gen
                stage.length = hop.start
                stage.predictions = {p: t for p, t in stage.predictions.items() if p <= hop.start}
            elif hop.start != stage.length:
                raise RingError(f"sequence {seq_id} stage {index}: a hop of generation {hop.gen} at position "
                                f"{hop.start} while the cache holds {stage.length} positions of that generation")
            expected = stage.predictions.get(hop.start)
            if hop.start >= hop.committed and expected is not None:
                stage.counts.checks += 1
                if expected != hop.tokens[0]:
                    stage.counts.flips += 1
                    stage.dead_below = hop.gen + 1
                    if index < self.n_stages - 1:  # the last stage's commit already told the head
                        self.outbox.append(Correction(seq_id, hop.gen, hop.start, expected, index))
                    continue
            stage.busy = True
            stage.length = hop.start + len(hop.tokens)
            stage.counts.runs += 1
            stage.counts.positions += len(hop.tokens)
            return Run(seq_id, hop.gen, index, hop.start, hop.tokens, predict=stage.predict,
                       final=index == self.n_stages - 1, committed=hop.committed, payload=hop.payload)
        return None

    def ran(self, run: Run, prediction: int | None = None, confidence: float = 1.0, payload: object = None) -> None:
        """A run handed out by take_runs is done: its prediction for position run.end (None when it
        predicts nothing), at an early stage the probability it gave it, and what its hop to the next
        stage carries (the hidden states)."""
        seq = self.sequences.get(run.seq_id)
        if seq is None:
            return  # closed meanwhile
        if run.predict and prediction is None:
            raise RingError(f"sequence {run.seq_id} stage {run.stage}: a run that predicts came back without one")
        if run.stage == 0:
            seq.head.busy = False
        if run.stage in seq.stages:
            stage = seq.stages[run.stage]
            stage.busy = False
            if run.gen != stage.gen:
                return
            if prediction is not None:
                stage.predictions = {p: t for p, t in stage.predictions.items() if p > run.end - KEPT_PREDICTIONS}
                stage.predictions[run.end] = prediction
        elif run.gen != seq.head.gen:
            return  # the timeline forked while stage 0 ran: nobody wants this any more
        if run.final:
            self._commit_run(seq, run, prediction)
        else:
            self.outbox.append(Hop(run.seq_id, run.gen, run.stage + 1, run.start, run.tokens, run.committed, payload))
        if run.stage == 0 and not run.final:
            self._guess(seq.head, run, prediction, confidence)

    def _commit_run(self, seq: _Sequence, run: Run, prediction: int) -> None:
        stage = seq.stages.get(run.stage)
        committed = stage.committed if stage is not None else seq.head.committed
        if run.end < committed:
            return  # a position committed before, run again after a fork that came too late
        if run.end != committed:
            raise RingError(f"sequence {run.seq_id}: the last stage predicted position {run.end} while "
                            f"{committed} positions are final")
        if stage is not None:
            stage.committed += 1
        self.outbox.append(Commit(run.seq_id, run.end, prediction))

    @staticmethod
    def _guess(head: _Head, run: Run, prediction: int | None, confidence: float) -> None:
        """Stage 0's prediction for the position after the run becomes the next input when it is sure."""
        if prediction is None or run.end != len(head.tokens) or run.end > head.last_position:
            return
        if confidence >= head.threshold:
            head.tokens.append(prediction)
            head.sure[run.end] = confidence
        else:
            head.held_guesses += 1
