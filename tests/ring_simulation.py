"""A discrete-event simulation of the ring data path: RingMachine state machines on simulated nodes, joined
by first-in first-out links with random delays, running a fake model whose hidden states are hashes
of their whole lineage (every cache entry they were computed from). A stale or missing cache entry
anywhere changes the last stage's prediction, so committed text equal to the reference decode means
every cut, drop and fork was right."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from dataclasses import dataclass, field
from functools import cache

from runtime.core.ring import Commit, Correction, Hop, RingMachine, Run

VOCAB = 1000


def mix(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def embed(token: int) -> int:
    return mix("token", token)


def stage_step(stage: int, previous: int | None, hidden_in: int) -> int:
    """A stage's output at one position: a function of its input and of every earlier cache entry."""
    return mix("stage", stage, previous, hidden_in)


def final(hidden: int) -> int:
    return mix("head", hidden) % VOCAB


@cache
def reference_next(n_stages: int, tokens: tuple[int, ...]) -> int:
    """Sequential decoding's next token after `tokens`: every stage's chain computed cleanly."""
    hidden = [embed(t) for t in tokens]
    for stage in range(n_stages):
        previous, out = None, []
        for h in hidden:
            previous = stage_step(stage, previous, h)
            out.append(previous)
        hidden = out
    return final(hidden[-1])


def grouped_as_plain_decoding(start: int, length: int, prompt_length: int, chunk: int) -> bool:
    """Whether a run of positions [start, start + length) is one plain decoding runs: a chunk of the prompt
    from position 0 on, or one later position alone (the kernels give other bits to other groupings)."""
    if start >= prompt_length:
        return length == 1
    return start % chunk == 0 and length == min(chunk, prompt_length - start)


def reference_decode(n_stages: int, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(reference_next(n_stages, tuple(tokens)))
    return tokens[len(prompt):]


@dataclass
class SimNode:
    name: str
    core: RingMachine
    caches: dict = field(default_factory=dict)  # (seq, stage) -> [(lineage hash, token)]
    busy: bool = False


@dataclass
class Simulation:
    n_stages: int
    hosting: list[tuple[int, ...]]  # stages per node
    window: int
    flip: list[float]  # per early stage: how often its guess is wrong
    thresholds: tuple[float, ...]
    rng: random.Random
    link_ms: tuple[float, float] = (0.5, 5.0)
    compute_ms: tuple[float, float] = (0.2, 2.0)
    prefill_chunk: int = 4
    run_ahead: float = 0.0  # how sure the head must be of its guesses in flight to run on them
    now: float = 0.0
    committed: dict = field(default_factory=dict)  # seq -> generated tokens, as the coordinator saw them
    wanted: dict = field(default_factory=dict)  # seq -> new tokens
    closed: set = field(default_factory=set)
    runs: list = field(default_factory=list)  # (seq, stage, start, positions) of every run

    def __post_init__(self):
        self.nodes = [SimNode(f"n{i}", RingMachine(stages, self.n_stages, prefill_chunk=self.prefill_chunk,
                                                       run_ahead=self.run_ahead))
                      for i, stages in enumerate(self.hosting)]
        self.node_of = {stage: node for node in self.nodes for stage in node.core.stages}
        self._events: list = []
        self._order = itertools.count()
        self._link_free: dict = {}  # (src, dst) -> time its last message arrives: links are FIFO
        self.prompts: dict = {}

    # --- plumbing ------------------------------------------------------------------------------

    def _at(self, when: float, action) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def _send(self, src: str, dst: str, deliver) -> None:
        if src == dst:
            deliver()
            return
        arrives = max(self.now + self.rng.uniform(*self.link_ms), self._link_free.get((src, dst), 0.0))
        self._link_free[(src, dst)] = arrives
        self._at(arrives, deliver)

    def _deliver(self, node: SimNode, message) -> None:
        node.core.receive(message)
        self._kick(node)

    def _route(self, node: SimNode, message) -> None:
        if isinstance(message, Hop):
            dst = self.node_of[message.stage]
            self._send(node.name, dst.name, lambda: self._deliver(dst, message))
        elif isinstance(message, Correction):
            dst = self.node_of[0]
            self._send(node.name, dst.name, lambda: self._deliver(dst, message))
        else:
            dst = self.node_of[0]
            self._send(node.name, dst.name, lambda: self._deliver(dst, message))
            self._send(node.name, "coordinator", lambda: self._coordinator_commit(message))

    # --- the coordinator -----------------------------------------------------------------------

    def open(self, seq_id: int, prompt: list[int], new_tokens: int) -> None:
        self.prompts[seq_id] = prompt
        self.committed[seq_id] = []
        self.wanted[seq_id] = new_tokens
        last_position = len(prompt) + new_tokens - 2

        def open_on(node: SimNode) -> None:
            node.core.open(seq_id, prompt, last_position=last_position, window=self.window,
                           guess_thresholds=self.thresholds)
            self._kick(node)

        for node in self.nodes:  # each open travels its own link: a node may hear from another one first
            self._send("coordinator", node.name, lambda n=node: open_on(n))

    def _coordinator_commit(self, commit: Commit) -> None:
        if commit.seq_id in self.closed:
            return
        generated = self.committed[commit.seq_id]
        assert commit.position == len(self.prompts[commit.seq_id]) + len(generated), "commits out of order"
        generated.append(commit.token)
        if len(generated) == self.wanted[commit.seq_id]:
            self.close(commit.seq_id)

    def close(self, seq_id: int) -> None:
        self.closed.add(seq_id)
        for node in self.nodes:
            self._send("coordinator", node.name, lambda n=node: self._close_on(n, seq_id))

    def _close_on(self, node: SimNode, seq_id: int) -> None:
        node.core.close(seq_id)
        for key in [k for k in node.caches if k[0] == seq_id]:
            del node.caches[key]

    # --- a node's shell ------------------------------------------------------------------------

    def _kick(self, node: SimNode) -> None:
        if node.busy:
            return
        runs = node.core.take_runs()
        for message in node.core.drain():  # corrections found while taking hops
            self._route(node, message)
        if not runs:
            return
        node.busy = True
        self._at(self.now + self.rng.uniform(*self.compute_ms), lambda: self._finish(node, runs))

    def _finish(self, node: SimNode, runs: list[Run]) -> None:
        for run in runs:
            if run.seq_id not in node.core.sequences:
                continue
            self.runs.append((run.seq_id, run.stage, run.start, len(run.tokens)))
            if run.stage == 0:
                inputs = [embed(t) for t in run.tokens]
            else:
                inputs = run.payload
            cache = node.caches.setdefault((run.seq_id, run.stage), [])
            assert len(cache) >= run.start, f"stage {run.stage} run at {run.start} with {len(cache)} cached: a gap"
            del cache[run.start:]
            outputs = []
            for token, h in zip(run.tokens, inputs):
                previous = cache[-1][0] if cache else None
                cache.append((stage_step(run.stage, previous, h), token))
                outputs.append(cache[-1][0])
            prediction, confidence = None, 1.0
            if run.final:
                prediction = final(outputs[-1])
            elif run.predict:
                prediction = reference_next(self.n_stages, tuple(t for _, t in cache))
                draw = random.Random(mix("flip", run.stage, outputs[-1]))
                if draw.random() < self.flip[run.stage]:
                    prediction = (prediction + 1 + draw.randrange(VOCAB - 1)) % VOCAB
                confidence = draw.random()
            node.core.ran(run, prediction, confidence, outputs)
            for message in node.core.drain():
                self._route(node, message)
        node.busy = False
        self._kick(node)

    def run(self, limit_events: int = 200_000) -> None:
        for _ in range(limit_events):
            if not self._events:
                return
            self.now, _, action = heapq.heappop(self._events)
            action()
        raise AssertionError("the simulation did not settle")
