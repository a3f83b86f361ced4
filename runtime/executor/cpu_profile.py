"""Where a node's CPU goes: counters since the node started, which `speed bench FILE --cpu` reads through
Info before and after its runs and turns into CPU per committed token.

Sections are timed with the calling thread's CPU clock (time.thread_time), not the wall clock, so a node
that shares its cores with others is not charged for the time it waited for one. Several threads add to
the same counters (the ring worker, gRPC handlers, peer links), hence the lock; its cost is a fraction of
a microsecond against sections of tens of microseconds or more.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SECTIONS = ("worker_cpu", "stage", "exit", "guess", "commit", "serialize")


class CpuProfile:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds = dict.fromkeys(SECTIONS, 0.0)
        self.stage_calls = 0
        self.stage_positions = 0  # positions computed for items by stage calls

    def add(self, section: str, seconds: float) -> None:
        with self._lock:
            self.seconds[section] += seconds

    def stage_call(self, seconds: float, positions: int) -> None:
        with self._lock:
            self.seconds["stage"] += seconds
            self.stage_calls += 1
            self.stage_positions += positions

    @contextmanager
    def timed(self, section: str) -> Iterator[None]:
        started = time.thread_time()
        try:
            yield
        finally:
            self.add(section, time.thread_time() - started)

    @contextmanager
    def worker(self) -> Iterator[None]:
        """The stage-running thread's CPU over the block, less what it spent serializing meanwhile (counted
        as serialization); for a block that only this thread runs."""
        started, serialized = time.thread_time(), self.seconds["serialize"]
        try:
            yield
        finally:
            self.add("worker_cpu", time.thread_time() - started - (self.seconds["serialize"] - serialized))
