"""What a node reports of its own speed when the coordinator asks it alone: the time a call takes when calls
follow each other, which a CPU quota's uneven slowing does not move from one asking to the next."""

import itertools

import pytest

from nodes import self_measure


def test_a_node_alone_reports_what_calls_take_one_after_another(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(self_measure.time, "perf_counter", lambda: clock[0])
    calls = itertools.count()

    def call():  # three calls in four within a quota period's budget, the fourth waiting for the next period
        clock[0] += 0.009 if next(calls) % 4 == 3 else 0.001

    assert self_measure.median_ms(call, repeats=9) == pytest.approx(1.0)  # what single calls mostly take
    assert self_measure.sustained_ms(call) == pytest.approx(3.0, rel=0.1)  # what decoding gets of the node
