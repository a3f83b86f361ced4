"""EMULATION for benchmarks: a one-way link of fixed latency that carries many messages at once.

A message put in arrives `delay_s` later; the sender is never blocked and messages keep their order.
With a delay of 0 it is a plain first-in first-out queue."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

_END = object()


class DelayLine:
    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self._queue: queue.Queue = queue.Queue()

    def put(self, item) -> None:
        self._queue.put((time.monotonic() + self.delay_s, item))

    def close(self) -> None:
        """End the iteration once everything put before has arrived."""
        self._queue.put((0.0, _END))

    def batches(self) -> Iterator[list]:
        """Lists of the items arriving together: each as soon as it is due, with all others due by then."""
        held = None  # taken from the queue but not due yet
        while True:
            due, item = held or self._queue.get()
            held = None
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            batch = []
            while item is not _END:
                batch.append(item)
                try:
                    following = self._queue.get_nowait()
                except queue.Empty:
                    break
                if following[0] > time.monotonic():
                    held = following
                    break
                item = following[1]
            if batch:
                yield batch
            if item is _END:
                return
