"""A node's stage worker: the one thread that runs its stages. Calls from many threads run there one at a
time, in order, and give back what they return or raise; the ring's arrivals reach the ring they were
sent to and no other; a stopped worker leaves no caller waiting."""

from __future__ import annotations

import threading
import time

import pytest

from nodes.stage_worker import StageWorker
from runtime.executor.cpu_profile import CpuProfile
from tests.conftest import in_threads


class Ring:
    def __init__(self) -> None:
        self.received: list = []

    def work(self, events: list) -> bool:
        self.received += events
        return False


def test_calls_from_many_threads_run_on_the_worker_one_at_a_time_and_answer_their_callers():
    worker = StageWorker(CpuProfile(), name="edge-1")
    running, overlaps, threads = [], [], set()

    def job(index: int) -> int:
        running.append(index)
        if len(running) > 1:
            overlaps.append(tuple(running))
        threads.add(threading.current_thread().name)
        time.sleep(0.001)
        running.remove(index)
        return index * index

    results, errors = in_threads(lambda i: worker.call(lambda: job(i)), 16)
    worker.stop()
    assert not errors and results == {i: i * i for i in range(16)}
    assert not overlaps and threads == {"stages-edge-1"}


def test_what_a_call_raises_is_raised_to_its_caller_and_the_worker_goes_on():
    worker = StageWorker(CpuProfile(), name="edge-1")

    def refuse() -> None:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        worker.call(refuse)
    assert worker.call(lambda: "still serving") == "still serving"
    worker.stop()


def test_arrivals_reach_the_ring_they_were_sent_to_and_are_dropped_once_it_is_replaced():
    worker = StageWorker(CpuProfile(), name="edge-1")
    first, second = Ring(), Ring()
    worker.call(lambda: setattr(worker, "ring", first))
    gate, busy = threading.Event(), threading.Event()
    blocker = threading.Thread(target=worker.call, args=(lambda: (busy.set(), gate.wait(5)),))
    blocker.start()
    busy.wait(timeout=5)  # the worker is busy: what follows waits in its inbox, to be taken in one batch
    worker.arrive(first, "messages", ["hop"])
    replacing = threading.Thread(target=worker.call, args=(lambda: setattr(worker, "ring", second),))
    replacing.start()
    time.sleep(0.1)
    worker.arrive(first, "messages", ["late hop"])
    worker.arrive(second, "control", "open")
    gate.set()
    blocker.join(timeout=5)
    replacing.join(timeout=5)
    worker.call(lambda: None)  # everything before it has been handled
    worker.stop()
    assert first.received == [("messages", ["hop"])]
    assert second.received == [("control", "open")]


def test_calls_queued_before_a_stop_finish_and_later_calls_run_on_their_caller():
    worker = StageWorker(CpuProfile(), name="edge-1")
    started = threading.Event()

    def slow() -> str:
        started.set()
        time.sleep(0.2)
        return "slow"

    results: dict[str, str] = {}
    holder = threading.Thread(target=lambda: results.setdefault("slow", worker.call(slow)))
    holder.start()
    started.wait(timeout=5)
    queued = threading.Thread(target=lambda: results.setdefault("queued", worker.call(lambda: "queued")))
    queued.start()
    time.sleep(0.05)
    worker.stop()
    holder.join(timeout=5)
    queued.join(timeout=5)
    assert results == {"slow": "slow", "queued": "queued"}
    assert worker.call(threading.current_thread) is threading.current_thread()
