"""The EMULATED link of the ring's benchmarks: a message arrives its latency after it was sent, in order,
and many messages travel at once (the sender never waits)."""

import threading
import time

from nodes.delay_line import DelayLine


def test_messages_arrive_after_the_latency_in_order_and_together():
    line = DelayLine(0.2)
    arrivals: list[tuple[float, list]] = []

    def receive():
        for batch in line.batches():
            arrivals.append((time.monotonic(), batch))

    reader = threading.Thread(target=receive)
    reader.start()
    sent = time.monotonic()
    for i in range(100):
        line.put(i)
    line.close()
    reader.join(timeout=10)
    assert [item for _, batch in arrivals for item in batch] == list(range(100))
    assert arrivals[0][0] - sent >= 0.2  # nothing comes early
    assert arrivals[-1][0] - sent < 100 * 0.2 / 2  # one link carries them all at once, not one after another


def test_with_no_latency_it_is_a_queue_that_ends_when_closed():
    line = DelayLine()
    line.put("a")
    line.put("b")
    line.close()
    assert [item for batch in line.batches() for item in batch] == ["a", "b"]
