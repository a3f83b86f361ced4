"""The queues a node sends through: a plain first-in first-out line, or, only where a link latency is
EMULATED for benchmarks, a delay line that carries many messages at once, each arriving `delay_s` after it
was put in. Either way the sender is never blocked, messages keep their order and are handed out in
batches of whatever has arrived."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

_END = object()


def line(delay_s: float) -> Line | DelayLine:
    """A delay line where a latency is emulated, else a plain line."""
    return DelayLine(delay_s) if delay_s > 0 else Line()


class Line:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item) -> None:
        self._queue.put(item)

    def close(self) -> None:
        """End the iteration once everything put before has been handed out."""
        self._queue.put(_END)

    def batches(self) -> Iterator[list]:
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not _END and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            ended = batch[-1] is _END
            if ended:
                batch.pop()
            if batch:
                yield batch
            if ended:
                return


class DelayLine:
    """EMULATION for benchmarks: a one-way link of fixed latency."""

    def __init__(self, delay_s: float):
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
