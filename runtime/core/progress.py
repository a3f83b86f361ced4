"""How far long work has got. A long function takes a Progress (default NO_PROGRESS, which reports
nothing) and reports through it; the command line decides where that goes and never draws from here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Progress:
    """Notes, lines saying what happens or what was found; and tasks, work counted in units (tensors, steps,
    runs, MB), one task at a time. This base class reports nothing."""

    def note(self, line: str) -> None:
        """A line saying what is happening or what was found."""

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[None]:
        """Work of `total` units (None: not known), named by what is counted, e.g. "tensors read"."""
        yield

    def advance(self, units: float = 1, status: str = "") -> None:
        """`units` more of the current task done; status: a few words on how it goes, e.g. the loss."""


NO_PROGRESS = Progress()
