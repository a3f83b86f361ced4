"""The lines a node sends through: the EMULATED link of the ring's benchmarks (a message arrives its
latency after it was sent, in order, and many messages travel at once; the sender never waits), and the
plain line used everywhere else."""

import threading
import time

from nodes.delay_line import DelayLine, Line, line


def test_messages_arrive_after_the_latency_in_order_and_together():
    delayed = DelayLine(0.2)
    arrivals: list[tuple[float, list]] = []

    def receive():
        for batch in delayed.batches():
            arrivals.append((time.monotonic(), batch))

    reader = threading.Thread(target=receive)
    reader.start()
    sent = time.monotonic()
    for i in range(100):
        delayed.put(i)
    delayed.close()
    reader.join(timeout=10)
    assert [item for _, batch in arrivals for item in batch] == list(range(100))
    assert arrivals[0][0] - sent >= 0.2  # nothing comes early
    assert arrivals[-1][0] - sent < 100 * 0.2 / 2  # one link carries them all at once, not one after another


def test_with_no_latency_it_is_a_plain_line_that_hands_out_what_arrived_and_ends_when_closed():
    plain = line(0.0)
    assert isinstance(plain, Line) and isinstance(line(0.001), DelayLine)
    plain.put("a")
    plain.put("b")
    batches = plain.batches()
    assert next(batches) == ["a", "b"]
    plain.put("c")
    plain.close()
    plain.put("after the end")
    assert list(batches) == [["c"]]
