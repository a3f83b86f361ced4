"""Run one SPEED tick: every in-flight item of the stages that share weights in ONE ONNX Runtime call.

Cache rows are laid out stage-major, row = stage * slots + slot, so the rows of stages that share a
graph form one contiguous range and are passed to the graph as zero-copy views. Rows with no item this
tick ride along with zero input and their outputs are dropped. Items of different lengths (prompt
chunks next to decode tokens) run in separate calls rather than padded together: padding would not
change the mathematics but would change floating-point summation order, and a row must compute the
same bits whatever else shares its tick, or sampled text could depend on the batch. Decode ticks,
where every item is one token, are one call. The shared classifier then runs once over every item.
"""

from __future__ import annotations

from itertools import groupby

import numpy as np

from nodes.executor import StageModel
from nodes.kv_cache import KVCache
from runtime.errors import SpeedError
from runtime.sampling import GREEDY, SamplingParams, choose_token
from runtime.speed_core import Item, TickPlan


class TickExecutor:
    def __init__(self, model: StageModel, *, slots: int, capacity: int):
        self.model = model
        self.cfg = model.config
        self.slots = slots
        self.cache = KVCache(self.cfg, rows=slots * self.cfg.n_stages, capacity=capacity)
        self._slot_of: dict[int, int] = {}
        self._sampling: dict[int, SamplingParams] = {}
        self._hidden: dict[tuple[int, int], np.ndarray] = {}  # (seq, start) -> (length, d) after its last stage
        # stages that share a graph and are contiguous run together
        stages = range(self.cfg.n_stages)
        self._stage_groups = [list(g) for _, g in groupby(stages, key=model.graph_of)]

    def open(self, seq_id: int, sampling: SamplingParams = GREEDY) -> None:
        free = sorted(set(range(self.slots)) - set(self._slot_of.values()))
        if not free:
            raise SpeedError(f"all {self.slots} sequence slots are in use")
        self._slot_of[seq_id] = free[0]
        self._sampling[seq_id] = sampling
        for stage in range(self.cfg.n_stages):
            self.cache.truncate(self._row(seq_id, stage), 0)

    def close(self, seq_id: int) -> None:
        self._slot_of.pop(seq_id, None)
        self._sampling.pop(seq_id, None)

    def _row(self, seq_id: int, stage: int) -> int:
        return stage * self.slots + self._slot_of[seq_id]

    def run(self, plan: TickPlan) -> dict[tuple[int, int], int]:
        """Run the plan's items; return each item's prediction for the position after it."""
        for cut in plan.truncations:
            if cut.seq_id in self._slot_of:
                row = self._row(cut.seq_id, cut.stage)
                self.cache.truncate(row, min(cut.length, int(self.cache.lengths[row])))
        for seq_id in plan.finished:
            self.close(seq_id)
        if not plan.items:
            return {}
        last_hidden: dict[Item, np.ndarray] = {}
        hidden_after: dict[tuple[int, int], np.ndarray] = {}
        for group in self._stage_groups:
            items = sorted((item for item in plan.items if item.stage in group), key=lambda item: item.length)
            for _, same_length in groupby(items, key=lambda item: item.length):
                self._run_call(group, list(same_length), last_hidden, hidden_after)
        self._hidden = hidden_after
        return self._predict(plan.items, last_hidden)

    def _run_call(self, stages: list[int], items: list[Item], last_hidden: dict, hidden_after: dict) -> None:
        """One graph call for items of equal length on stages that share the graph."""
        rows = slice(stages[0] * self.slots, (stages[-1] + 1) * self.slots)
        width = items[0].length
        hidden = np.zeros((rows.stop - rows.start, width, self.cfg.d_model), dtype=np.float32)  # (B, T, d)
        for item in items:
            row = self._row(item.seq_id, item.stage)
            if self.cache.lengths[row] != item.start:
                raise SpeedError(f"sequence {item.seq_id} stage {item.stage}: cache holds {self.cache.lengths[row]} "
                                 f"positions but the item starts at {item.start}")
            if item.tokens is not None:
                hidden[row - rows.start] = self.model.embed(np.asarray(item.tokens, dtype=np.int64))
            else:
                hidden[row - rows.start] = self._hidden[(item.seq_id, item.start)]
        out = self.model.run_stage(stages[0], hidden, self.cache, rows)
        for item in items:
            r = self._row(item.seq_id, item.stage) - rows.start
            self.cache.append(r + rows.start, [k[r] for k in out.new_keys], [v[r] for v in out.new_values], item.length)
            hidden_after[(item.seq_id, item.start)] = out.hidden[r]
            last_hidden[item] = out.hidden[r, -1]

    def _predict(self, items: list[Item], last_hidden: dict[Item, np.ndarray]) -> dict[tuple[int, int], int]:
        logits, greedy = self.model.classify(np.stack([last_hidden[item] for item in items]))  # (N, V), (N,)
        predictions = {}
        for i, item in enumerate(items):
            sampling = self._sampling[item.seq_id]
            if item.final_token and not sampling.greedy:
                predictions[(item.seq_id, item.start)] = choose_token(logits[i], sampling, item.start + item.length)
            else:
                predictions[(item.seq_id, item.start)] = int(greedy[i])
        return predictions
