"""What a node measures about itself for placing stages: how long a pass of each stage graph it holds takes
at the row counts a tick uses, how long the classifier takes, and how much memory its machine has free.

The passes are timed at start, after the warm-up and before the node registers, so they are measured on
an idle node (what it can do, not what it happens to be doing) and cost under a second for a small model.
Each figure is the fastest of its timed passes: the other nodes of a cluster starting on the same machine
only ever slow a pass down (by twice, on two cores), while a slower device slows every one. When the
coordinator asks again (Measure, one node of a machine at a time), nothing else runs there then, and each figure
is the time a call takes when calls follow each other: a CPU quota slows some calls and not others.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from runtime.executor.kv_cache import tiled
from runtime.executor.stage_model import StageModel
from runtime.wire import speed_pb2 as pb

TICK_ROWS = (1, 2, 4)  # sequences in one pass: alone, and the rows of a speculative tick
CACHED_POSITIONS = 32  # each row's cache: a short context, where the weights dominate a pass
REPEATS = 5  # timed calls per figure, after one untimed
PASS_REPEATS = 9  # timed passes per stage and row count, after one untimed; the fastest is reported
SUSTAINED_BLOCK_S = 0.04  # a block of calls timed together when a node measures itself alone: 13 quota periods
SUSTAINED_BLOCKS = 3
BLOCK_CALLS = 30  # at most this many calls a block (the demo model's passes: 9 ms, 9 quota periods at a third)


def measure_passes(model: StageModel, stages: list[int], *, alone: bool = False) -> tuple[list[pb.PassTime], float]:
    """(each stage's pass time per row count, the classifier's time for one row), in milliseconds: the fastest
    of the timed passes, or with `alone` (nothing else runs beside it: the coordinator measures one node at a
    time) the time a call takes when calls follow each other (sustained_ms)."""
    timed = sustained_ms if alone else fastest_ms
    cfg = model.config
    times, timed_graphs = [], {}  # (graph, rows) -> ms: stages running one graph take the same time, timed once
    for stage in stages:
        layers = len(cfg.stage_layers(stage))
        for rows in TICK_ROWS:
            graph = (model.graph_of(stage), rows)
            if graph not in timed_graphs:
                cache = model.new_cache(rows=rows, capacity=tiled(CACHED_POSITIONS + 1), layers=layers)
                cache.lengths[:] = CACHED_POSITIONS
                hidden = np.zeros((rows, 1, cfg.d_model), np.float32)
                timed_graphs[graph] = timed(partial(model.run_stage, stage, hidden, cache, slice(0, rows)))
            times.append(pb.PassTime(stage=stage, rows=rows, ms=timed_graphs[graph]))
    return times, timed(partial(model.classify, np.zeros((1, cfg.d_model), np.float32)))


def memory_available_bytes() -> int:
    """The kernel's estimate of the memory new work can use without swapping; 0 where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def sustained_ms(call: Callable[[], object], block_s: float = SUSTAINED_BLOCK_S, blocks: int = SUSTAINED_BLOCKS) -> float:
    """What a call takes when calls follow each other: the median over `blocks` of a block's time per call,
    each block calling for block_s or BLOCK_CALLS calls, whichever comes first. Under a CPU quota single calls
    are bimodal (within the period's budget, or waiting for the next period: SmolLM2's classifier 1.9 or 10
    ms under a third of a core, where its median of 9 moved from start to start); a block of many periods
    averages that out, as decoding does. The cap on calls keeps a small model's figures quick: a serving node
    measures on its stage worker."""
    call()  # warms caches, or connects
    per_call = []
    for _ in range(blocks):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < block_s and calls < BLOCK_CALLS:
            call()
            calls += 1
        per_call.append(elapsed / calls * 1e3)
    return round(statistics.median(per_call), 4)


def median_ms(call: Callable[[], object], repeats: int = REPEATS) -> float:
    """The median of `repeats` timed calls, after one untimed (which warms caches, or connects)."""
    return round(statistics.median(_timed_ms(call, repeats)), 4)


def fastest_ms(call: Callable[[], object], repeats: int = PASS_REPEATS) -> float:
    """The fastest of `repeats` timed calls, after one untimed."""
    return round(min(_timed_ms(call, repeats)), 4)


def _timed_ms(call: Callable[[], object], repeats: int) -> list[float]:
    call()  # warms caches, or connects
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1e3)
    return samples
