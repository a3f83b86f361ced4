"""Run one SPEED tick: every in-flight item of the stages that share weights in ONE ONNX Runtime call.

An executor hosts some of the model's stages (all of them in one process, a few on a cluster node).
Cache rows are grouped by stage graph and laid out slot-major inside a group, row = group offset +
slot * stages in group + stage index, so one sequence's stages are neighbours and a call passes only
the contiguous span of rows its items use, as zero-copy views. Rows inside the span with no item ride
along with zero input and their outputs are dropped. Items of different lengths (prompt chunks next
to decode tokens) run in separate calls rather than padded together: padding would not change the
mathematics but would change floating-point summation order, and a row must compute the same bits
whatever else shares its tick, or sampled text could depend on the batch. A stage with a one-layer
exit keeps an exit cache row per sequence too, written by every position that passes the stage and
cut with the stage's row. The shared classifier then runs once over every item.

Where the model keeps hidden states on its device (a GPU's decode tiles), a decode call's items take their inputs
from the states their previous stage left there and leave theirs (KeptRows), and the classifier reads them there;
only what leaves the executor (a hop to another node) or is computed on the host (exits) is read back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from itertools import groupby
from typing import NamedTuple

import numpy as np

from runtime.core.errors import SpeedError
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.core.scheduler import Item, TickPlan
from runtime.executor.cpu_profile import CpuProfile
from runtime.executor.draws import classify_rows
from runtime.executor.kept_states import FROM_HIDDEN, FROM_TOKEN, RIDES
from runtime.executor.kv_cache import CAPACITY_TILE, KVCache
from runtime.executor.stage_model import KeptRows, StageModel

Key = tuple[int, int]  # (sequence, start position) names an item across ticks


class TickResult(NamedTuple):
    predictions: dict[Key, int]  # each item's prediction for the position after it
    handoff: dict[Key, np.ndarray]  # (length, d) hidden states whose next stage is hosted elsewhere, on the host
    confidence: dict[Key, float]  # an early stage's probability of its guess, for the confidence gate


class TickExecutor:
    def __init__(self, model: StageModel, *, slots: int, capacity: int, stages: Iterable[int] | None = None,
                 hand_over_locally: bool = True, profile: CpuProfile | None = None):
        """hand_over_locally: an item's hidden state stays here for the next hosted stage's next run (a
        tick); False hands every hidden state out and takes every input in (the ring decides when the
        next stage runs). profile: where the time of stage, exit and classifier calls is counted."""
        self.model = model
        self.profile = profile or CpuProfile()
        self.hand_over_locally = hand_over_locally
        self.cfg = model.config
        self.slots = slots
        self.stages = sorted(stages) if stages is not None else list(range(self.cfg.n_stages))
        # stages that share a graph and are neighbours here run together
        self._groups = [list(g) for _, g in groupby(self.stages, key=model.graph_of)]
        self._group_of: dict[int, tuple[int, int, int]] = {}  # stage -> (group offset, group size, index)
        offset = 0
        for group in self._groups:
            for index, stage in enumerate(group):
                self._group_of[stage] = (offset, len(group), index)
            offset += slots * len(group)
        self.cache = model.new_cache(rows=offset, capacity=capacity)
        self._exit_stages = [stage for stage in self.stages if stage in model.exit_layer_stages]
        self.exit_cache = model.new_cache(rows=slots * len(self._exit_stages), capacity=capacity, layers=1)
        self._slot_of: dict[int, int] = {}
        self._sampling: dict[int, SamplingParams] = {}
        self._plain_guesses: set[int] = set()  # sequences whose guesses skip the exits
        # hidden state after an item's stage, for the next hosted stage
        self._hidden: dict[Key, np.ndarray | KeptRows] = {}

    @property
    def open_sequences(self) -> list[int]:
        return list(self._slot_of)

    def is_open(self, seq_id: int) -> bool:
        return seq_id in self._slot_of

    def open(self, seq_id: int, sampling: SamplingParams = GREEDY, capacity: int | None = None, *,
             plain_guesses: bool = False) -> None:
        """Give a sequence a slot; its caches grow to `capacity` positions if they hold fewer.
        plain_guesses: early stages guess through the plain head even when the model has exits."""
        free = sorted(set(range(self.slots)) - set(self._slot_of.values()))
        if not free:
            raise SpeedError(f"all {self.slots} sequence slots are in use")
        if capacity is not None and (capacity > self.cache.capacity or not self._slot_of):
            self._resize(max(capacity, 1))
        self._slot_of[seq_id] = free[0]
        self._sampling[seq_id] = sampling
        if plain_guesses:
            self._plain_guesses.add(seq_id)
        for stage in self.stages:
            self._truncate(seq_id, stage, 0)

    def close(self, seq_id: int) -> None:
        """Free a sequence's slot; the last one to go gives the caches' memory back (the next open
        allocates them again anyway), so an idle node holds no more than it did at start (a GPU's caches stay
        where its captured decode ticks expect them: DeviceKVCache). Its rows are emptied:
        rows ride along in the calls of their neighbours, and a row full to the model's context would be written
        beyond the rotary tables of a bundle's graphs."""
        if seq_id in self._slot_of:
            for stage in self.stages:
                self._truncate(seq_id, stage, 0)
        if self._slot_of.pop(seq_id, None) is not None and not self._slot_of and self.cache.capacity > CAPACITY_TILE:
            self._resize(1)
            self._hidden = {}
        self._sampling.pop(seq_id, None)
        self._plain_guesses.discard(seq_id)

    def _resize(self, capacity: int) -> None:
        self.cache.resize(capacity)
        self.exit_cache.resize(capacity)

    def row(self, seq_id: int, stage: int) -> int:
        offset, size, index = self._group_of[stage]
        return offset + self._slot_of[seq_id] * size + index

    def exit_row(self, seq_id: int, stage: int) -> int:
        return self._slot_of[seq_id] * len(self._exit_stages) + self._exit_stages.index(stage)

    def _truncate(self, seq_id: int, stage: int, length: int) -> None:
        """Cut the stage's cache row, and its exit's, to at most `length` positions."""
        rows = [(self.cache, self.row(seq_id, stage))]
        if stage in self._exit_stages:
            rows.append((self.exit_cache, self.exit_row(seq_id, stage)))
        for cache, row in rows:
            cache.truncate(row, min(length, int(cache.lengths[row])))

    def cache_length(self, seq_id: int, stage: int) -> int:
        return int(self.cache.lengths[self.row(seq_id, stage)])

    def held_length(self, key: Key) -> int | None:
        """Positions of the hidden state kept from last tick for this item's next hosted stage, if any."""
        hidden = self._hidden.get(key)
        return None if hidden is None else len(hidden)  # a KeptRows item's: its one row, one position

    def run(self, plan: TickPlan, hidden_in: Mapping[Key, np.ndarray] | None = None) -> TickResult:
        """Run the plan's items. An item at a stage whose predecessor is hosted elsewhere takes its
        input from hidden_in; otherwise from its tokens (stage 0) or from this executor's last tick."""
        for cut in plan.truncations:
            if cut.seq_id in self._slot_of:
                self._truncate(cut.seq_id, cut.stage, cut.length)
        for seq_id in plan.finished:
            self.close(seq_id)
        if not plan.items:
            return TickResult({}, {}, {})
        last_hidden: dict[Item, np.ndarray | KeptRows] = {}
        hidden_after: dict[Key, np.ndarray | KeptRows] = {}
        # kept states are read by the next stage's call in the next tick: a group runs before the one it feeds
        for group in reversed(self._groups) if self.model.keeps_states else self._groups:
            items = sorted((item for item in plan.items if item.stage in group), key=lambda item: item.length)
            for _, same_length in groupby(items, key=lambda item: item.length):
                self._run_call(group[0], list(same_length), hidden_in or {}, last_hidden, hidden_after)
        self._hidden = {}
        handoff = {}
        for item in plan.items:
            key = (item.seq_id, item.start)
            if self.hand_over_locally and item.stage + 1 in self._group_of:
                self._hidden[key] = hidden_after[key]
            elif not item.final:
                handoff[key] = hidden_after[key]
        if self.model.keeps_states:
            handoff = self._on_host(handoff)
        last_hidden |= self._run_exits(plan.items, hidden_after)
        predictions, confidence = self._predict(plan.items, last_hidden)
        return TickResult(predictions, handoff, confidence)

    def _input_of(self, item: Item, hidden_in: Mapping[Key, np.ndarray]) -> np.ndarray | KeptRows:
        key = (item.seq_id, item.start)
        if item.tokens is not None:
            return self.model.embed(np.asarray(item.tokens, dtype=np.int64))
        if self._hands_over_locally(item):
            return self._hidden[key]
        return hidden_in[key]

    def _hands_over_locally(self, item: Item) -> bool:
        """Whether the item's input is the hidden state its previous stage left here."""
        return self.hand_over_locally and item.stage - 1 in self._group_of

    def _run_call(self, stage: int, items: list[Item], hidden_in: Mapping[Key, np.ndarray], last_hidden: dict,
                  hidden_after: dict) -> None:
        """One graph call for items of equal length on stages that share the graph of `stage`."""
        def run(hidden: np.ndarray, rows: slice) -> np.ndarray:
            started = time.thread_time()
            out = self.model.run_stage(stage, hidden, self.cache, rows)
            self.profile.stage_call(time.thread_time() - started, len(items) * items[0].length)
            return out

        item_rows = [self.row(item.seq_id, item.stage) for item in items]
        if self.model.keeps_states and items[0].length == 1:
            outputs = self._run_kept(stage, items, item_rows, hidden_in)
        else:
            inputs = [self._input_of(item, hidden_in) for item in items]
            outputs = self._call(items, item_rows, self._on_host(inputs) if self.model.keeps_states else inputs,
                                 self.cache, run)
        for item, out in zip(items, outputs):
            hidden_after[(item.seq_id, item.start)] = out
            last_hidden[item] = out if isinstance(out, KeptRows) else out[-1]

    def _run_kept(self, stage: int, items: list[Item], item_rows: list[int], hidden_in: Mapping[Key, np.ndarray]
                  ) -> list[KeptRows]:
        """One decode call whose items' hidden states stay on the device: each takes its input from the state its
        previous stage kept, from its token's embedding (on the device too), or from the host (another node's hop)."""
        rows = self._span(items, item_rows, self.cache)
        sources = np.full(rows.stop - rows.start, RIDES)  # rows in the span without an item ride along
        tokens = np.zeros(len(sources), np.int64)
        hidden = None
        for item, row in zip(items, item_rows):
            at = row - rows.start
            if item.tokens is not None:
                sources[at], tokens[at] = FROM_TOKEN, item.tokens[0]
                continue
            key = (item.seq_id, item.start)
            x = self._hidden[key] if self._hands_over_locally(item) else hidden_in[key]
            if isinstance(x, KeptRows):
                sources[at] = x.rows[0]
            else:
                sources[at] = FROM_HIDDEN
                if hidden is None:
                    hidden = np.zeros((len(sources), 1, self.cfg.d_model), dtype=np.float32)
                hidden[at] = x
        started = time.thread_time()
        self.model.run_kept(stage, self.cache, rows, sources, tokens, hidden)
        self.profile.stage_call(time.thread_time() - started, len(items))
        for row in item_rows:
            self.cache.advance(row, 1)
        return [KeptRows(self.cache, (row,)) for row in item_rows]

    def _on_host(self, hidden: Mapping | list) -> Mapping | list:
        """These hidden states (a list, or a mapping's values) with those kept on the device read back in one copy."""
        values = list(hidden.values()) if isinstance(hidden, Mapping) else hidden
        kept = [value for value in values if isinstance(value, KeptRows)]
        if not kept:
            return hidden
        read = iter(self.model.read_kept(KeptRows(self.cache, tuple(value.rows[0] for value in kept))))
        values = [next(read) if isinstance(value, KeptRows) else value for value in values]
        return dict(zip(hidden, values)) if isinstance(hidden, Mapping) else values

    def _head_rows(self, inputs: list[np.ndarray | KeptRows]) -> np.ndarray | KeptRows:
        """A classifier call's rows where the model keeps states: those kept read on the device, the others given."""
        kept = [isinstance(x, KeptRows) for x in inputs]
        if not any(kept):
            return np.stack(inputs)
        given = None
        if not all(kept):
            given = np.zeros((len(inputs), self.cfg.d_model), dtype=np.float32)
            for row, (x, on_device) in enumerate(zip(inputs, kept)):
                if not on_device:
                    given[row] = x
        return KeptRows(self.cache, tuple(x.rows[0] if on_device else FROM_HIDDEN for x, on_device in zip(inputs, kept)),
                        given)

    def _span(self, items: list[Item], item_rows: list[int], cache: KVCache) -> slice:
        """The span of rows a call over these items uses, once each item's row is checked to start where it does
        and to have room."""
        for item, row in zip(items, item_rows):
            if cache.lengths[row] != item.start:
                raise SpeedError(f"sequence {item.seq_id} stage {item.stage}: cache holds {cache.lengths[row]} "
                                 f"positions but the item starts at {item.start}")
            cache.check_room(row, item.length)
        return slice(min(item_rows), max(item_rows) + 1)

    def _call(self, items: list[Item], item_rows: list[int], inputs: list[np.ndarray], cache: KVCache,
              run: Callable[[np.ndarray, slice], np.ndarray]) -> list[np.ndarray]:
        """One call over the span of rows the items use: their new cache entries are kept and each item's
        hidden states (length, d) returned."""
        rows = self._span(items, item_rows, cache)
        hidden = np.zeros((rows.stop - rows.start, items[0].length, self.cfg.d_model), dtype=np.float32)  # (B, T, d)
        for row, x in zip(item_rows, inputs):
            hidden[row - rows.start] = x
        out = run(hidden, rows)
        for item, row in zip(items, item_rows):
            cache.advance(row, item.length)
        return [out[row - rows.start] for row in item_rows]

    def _guesses_through_exit(self, item: Item) -> bool:
        return item.predict and not item.final and item.seq_id not in self._plain_guesses

    def _run_exits(self, items: list[Item], hidden_after: Mapping[Key, np.ndarray | KeptRows]
                   ) -> dict[Item, np.ndarray]:
        """Every position of a guessing item passes its stage's one-layer exit (whose cache needs them all);
        returns what the last position's guess reads, per item."""
        reads = {}
        if not self._exit_stages:
            return reads
        started = time.thread_time()
        for stage in self._exit_stages:
            at_stage = sorted((item for item in items if item.stage == stage and self._guesses_through_exit(item)),
                              key=lambda item: item.length)
            for _, same_length in groupby(at_stage, key=lambda item: item.length):
                group = list(same_length)
                outputs = self._call(group, [self.exit_row(item.seq_id, stage) for item in group],
                                     self._on_host([hidden_after[(item.seq_id, item.start)] for item in group]),
                                     self.exit_cache,
                                     lambda hidden, rows, s=stage: self.model.run_exit_layer(s, hidden, self.exit_cache,
                                                                                            rows))
                reads |= {item: out[-1] for item, out in zip(group, outputs)}
        self.profile.add("exit", time.thread_time() - started)
        return reads

    def _head_input(self, item: Item, hidden: np.ndarray | KeptRows) -> np.ndarray | KeptRows:
        """A guess reads the head through its stage's exit map, if any; a committed token never does
        (a one-layer exit's output is already in `hidden`)."""
        exit_map = self.model.exit_maps.get(item.stage)
        if exit_map is None or not self._guesses_through_exit(item):
            return hidden
        return exit_map.apply(self._on_host([hidden])[0][-1] if isinstance(hidden, KeptRows) else hidden)

    def _predict(self, items: list[Item], last_hidden: dict[Item, np.ndarray | KeptRows]
                 ) -> tuple[dict[Key, int], dict[Key, float]]:
        """Predictions of the items that want one, and the guesses' probabilities; the classifier does
        not run when no item wants a prediction. With a guess head, guesses are scored by it alone."""
        items = [item for item in items if item.predict]
        if not items:
            return {}, {}
        vocabulary = self.model.guess_vocabulary
        if vocabulary is None:  # one call classifies guesses and committed tokens together
            groups = [(items, False, None)]
        else:
            groups = [([item for item in items if item.final], False, None),
                      ([item for item in items if not item.final], True, vocabulary)]
        predictions, confidence = {}, {}
        for group, guesses, token_ids in groups:
            if group:
                self._classify(group, guesses, token_ids, last_hidden, predictions, confidence)
        return predictions, confidence

    def _classify(self, items: list[Item], guesses: bool, token_ids: np.ndarray | None,
                  last_hidden: dict[Item, np.ndarray | KeptRows], predictions: dict, confidence: dict) -> None:
        """One classifier call over the items, through the guess head with `guesses`; token_ids: the tokens
        its scores are for (None: all). Hidden states kept on the device are read there."""
        started = time.thread_time()
        inputs = [self._head_input(item, last_hidden[item]) for item in items]
        hidden = self._head_rows(inputs) if self.model.keeps_states else np.stack(inputs)
        chosen = classify_rows(self.model, hidden, [self._sampling[item.seq_id] for item in items],
                               [item.start + item.length for item in items], np.array([not item.final for item in items]),
                               guesses=guesses, token_ids=token_ids)
        for item, (index, probability) in zip(items, chosen):
            key = (item.seq_id, item.start)
            predictions[key] = index if token_ids is None else int(token_ids[index])
            if not item.final:
                confidence[key] = probability
        # the call's time is shared out by rows between guesses and committed tokens
        seconds, final = time.thread_time() - started, sum(item.final for item in items)
        self.profile.add("commit", seconds * final / len(items))
        self.profile.add("guess", seconds * (len(items) - final) / len(items))
