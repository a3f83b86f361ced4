"""The one thread of a node that runs its stages. Every ONNX Runtime call and every change to the
node's sequences happens here, taken in order from one inbox: lockstep step messages, assignments and
idle expiry (calls whose callers wait for their answer), and the ring data path's arrivals (opens and
closes from the coordinator, hops, corrections and commits from the other nodes), which the node's
RingWorker applies and runs in batches. gRPC handlers only check, translate and enqueue.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

from runtime.executor.cpu_profile import CpuProfile

log = logging.getLogger("speed.node")
T = TypeVar("T")
_STOP = object()


class RingWork(Protocol):
    """What the worker asks of the node's RingWorker."""

    def work(self, events: list) -> bool:
        """Apply what arrived and run what can run; whether anything ran."""


class StageWorker:
    def __init__(self, profile: CpuProfile, *, name: str):
        self.profile = profile
        self.ring: RingWork | None = None  # set and cleared only on this thread (through call)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Lock()  # a call is queued before the worker stops, or runs on its caller
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"stages-{name}")
        self._thread.start()

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` on the worker thread and return what it returns (or raise what it raises)."""
        if threading.current_thread() is self._thread:
            return function()
        done: Future = Future()
        with self._stopping:
            if not self._stopped:
                self._inbox.put((done, function))
        if self._stopped:  # nothing runs stages any more: the caller may
            return function()
        try:
            return done.result()
        finally:  # a raised exception's traceback holds this frame: it must not keep the request alive
            del done, function

    def arrive(self, ring: RingWork, kind: str, payload) -> None:
        """A ring arrival for `ring`; dropped if another ring (a later assignment) has replaced it by then."""
        self._inbox.put((ring, (kind, payload)))

    def stop(self) -> None:
        """Finish the calls already queued and end the thread; later calls run on their callers."""
        self._inbox.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        busy = False  # the ring ran something: look for more work before waiting
        while True:
            try:
                jobs = [self._inbox.get(block=not busy)]
            except queue.Empty:
                jobs = []
            while not self._inbox.empty():
                jobs.append(self._inbox.get_nowait())
            if _STOP in jobs:
                self._finish(jobs)
                return
            arrivals = []  # in order: what came before a call reaches the ring that was current then
            for owner, work in jobs:
                if isinstance(owner, Future):
                    if arrivals:
                        self._ring_work(arrivals)
                        arrivals = []
                    self._run(owner, work)
                elif owner is self.ring:
                    arrivals.append(work)
            busy = self._ring_work(arrivals)
            jobs = arrivals = owner = work = None  # hold no message while waiting: a refused one's memory goes back

    def _ring_work(self, arrivals: list) -> bool:
        if self.ring is None:
            return False
        with self.profile.timed("worker_cpu"):
            return self.ring.work(arrivals)

    def _finish(self, jobs: list) -> None:
        with self._stopping:
            self._stopped = True
        while not self._inbox.empty():
            jobs.append(self._inbox.get_nowait())
        for job in jobs:
            if job is not _STOP and isinstance(job[0], Future):
                self._run(*job)

    def _run(self, done: Future, function: Callable) -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            with self.profile.worker():
                done.set_result(function())
        except BaseException as exc:  # the caller re-raises it on its own thread
            done.set_exception(exc)
        finally:  # the exception's traceback holds this frame: let it keep neither the future nor the request
            done = function = None
