"""Progress of a long command on stderr: notes as lines, and the current task as a bar that only a terminal
gets, so logs, pipes and --json output read as if there were none; stdout is never touched."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from runtime.core.progress import Progress


class StderrProgress(Progress):
    def __init__(self, *, bars: bool):
        self.bars = bars
        self._display = None  # rich's display of the current task, while it runs
        self._task_id = None

    def note(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)  # while a bar shows, rich's stand-in for stderr puts it above

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[None]:
        if not self.bars:
            yield
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Display

        # a narrow bar leaves room for the status on an 80-column terminal; stdout stays the command's own
        display = Display(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                          console=Console(stderr=True), transient=True, redirect_stdout=False)
        with display:  # a bar goes away when its task ends, by error or Ctrl-C too
            self._display, self._task_id = display, display.add_task(description, total=total, status="")
            try:
                yield
            finally:
                self._display = self._task_id = None

    def advance(self, units: float = 1, status: str = "") -> None:
        if self._display is not None:
            self._display.update(self._task_id, advance=units, **({"status": status} if status else {}))


def stderr_progress(*, json_output: bool = False) -> StderrProgress:
    """Bars only where a person watches: stderr is a terminal and the output is not JSON for a program."""
    return StderrProgress(bars=sys.stderr.isatty() and not json_output)
