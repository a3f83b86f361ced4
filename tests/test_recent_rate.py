"""A node's recent load: the window of batches behind step_ms and positions_per_s in its heartbeats."""

import pytest

from runtime.core.recent_rate import RecentLoad, RecentRate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_batch_reads_zero():
    assert RecentRate(clock=Clock()).read() == RecentLoad(0.0, 0.0)


def test_mean_batch_time_and_positions_over_the_whole_window():
    clock = Clock()
    rate = RecentRate(10.0, clock=clock)
    rate.add(positions=4, seconds=0.010)
    clock.now += 1
    rate.add(positions=16, seconds=0.030)
    load = rate.read()
    assert load.step_ms == pytest.approx(20.0)
    assert load.positions_per_s == pytest.approx(2.0)  # 20 positions over a 10 s window


def test_batches_older_than_the_window_are_forgotten():
    clock = Clock()
    rate = RecentRate(10.0, clock=clock)
    rate.add(positions=100, seconds=1.0)
    clock.now += 5
    rate.add(positions=10, seconds=0.002)
    clock.now += 5  # the first batch finished exactly one window ago: out
    assert rate.read() == pytest.approx(RecentLoad(2.0, 1.0))
    clock.now += 5
    assert rate.read() == RecentLoad(0.0, 0.0)


def test_a_steady_load_reads_the_same_whatever_the_batch_size():
    def steady(batch: int) -> float:
        clock = Clock()
        rate = RecentRate(10.0, clock=clock)
        for _ in range(int(60 * 50 / batch)):  # 50 positions a second for a minute
            clock.now += batch / 50
            rate.add(positions=batch, seconds=0.001)
        return rate.read().positions_per_s

    assert steady(1) == pytest.approx(50.0, rel=0.01)
    assert steady(25) == pytest.approx(50.0, rel=0.01)


def test_the_window_must_be_positive():
    with pytest.raises(ValueError, match="window_s must be above 0"):
        RecentRate(0.0)
