"""A node's recent load: the batches it ran in the last few seconds, as a mean batch time and a rate.

The one rule: a batch counts while it finished less than `window_s` ago; the rate is the positions of
those batches over the whole window, so a steady load reads the same whatever the batch size, and an
idle node falls to 0 one window after its last batch. Pure: the clock is injected, nothing else is read.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

WINDOW_S = 10.0  # how far back `speed status` looks


class RecentLoad(NamedTuple):
    step_ms: float  # mean wall time of one batch in the window, milliseconds; 0 without any
    positions_per_s: float  # positions the window's batches processed, per second of the window


class RecentRate:
    def __init__(self, window_s: float = WINDOW_S, *, clock: Callable[[], float] = time.monotonic):
        if not window_s > 0:
            raise ValueError(f"window_s must be above 0, got {window_s!r}")
        self.window_s = window_s
        self._clock = clock
        self._batches: deque[tuple[float, int, float]] = deque()  # (finished at, positions, seconds)
        self._lock = threading.Lock()  # one thread runs batches while another reads for the heartbeat

    def add(self, positions: int, seconds: float) -> None:
        """A batch of `positions` positions that took `seconds` of wall time has just finished."""
        with self._lock:
            now = self._clock()
            self._batches.append((now, positions, seconds))
            self._forget_before(now - self.window_s)

    def read(self) -> RecentLoad:
        with self._lock:
            self._forget_before(self._clock() - self.window_s)
            if not self._batches:
                return RecentLoad(0.0, 0.0)
            seconds = sum(s for _, _, s in self._batches)
            positions = sum(p for _, p, _ in self._batches)
            return RecentLoad(1000.0 * seconds / len(self._batches), positions / self.window_s)

    def _forget_before(self, horizon: float) -> None:
        while self._batches and self._batches[0][0] <= horizon:
            self._batches.popleft()
