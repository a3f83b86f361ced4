"""How sure stage 0 must be of a guess to keep running ahead on it.

Running the positions after a guess that is right with probability c makes them ready a commit's round
trip (the lag) sooner than waiting for the guess to be committed; when it is wrong, the pass is thrown
away. It is worth running when c x lag >= (1 - c) x pass, that is from c = pass / (lag + pass) on. On
fast links the lag is a few passes and unsure guesses wait; on slow links the lag is long and nearly
every guess runs. Both times are measured as they come and smoothed.

c is the probability the stage gives its guess, which is not how often such guesses turn out right (the
demo model's guesses agree with the last stage far more often than their probabilities say), so the head
pauses sooner than the break-even would have it: a little speed lost on slow links for far fewer passes
thrown away (both measured in docs/performance.md).
"""

from __future__ import annotations

SMOOTHING = 0.1  # weight of the newest measurement


class RunAheadPrice:
    def __init__(self) -> None:
        self.pass_s: float | None = None  # a batch of stage 0
        self.lag_s: float | None = None  # from a stage 0 run to the commit of the position after it

    def ran(self, seconds: float) -> None:
        self.pass_s = _smoothed(self.pass_s, seconds)

    def waited(self, seconds: float) -> None:
        self.lag_s = _smoothed(self.lag_s, seconds)

    @property
    def threshold(self) -> float:
        """The probability a chain of guesses needs; 0 (always run) until both times are measured."""
        if self.pass_s is None or self.lag_s is None or self.pass_s + self.lag_s <= 0:
            return 0.0
        return self.pass_s / (self.lag_s + self.pass_s)


def _smoothed(mean: float | None, value: float) -> float:
    return value if mean is None else mean + SMOOTHING * (value - mean)
