"""A command run on a pseudo-terminal, as a person at a terminal runs it: what it writes, read as it comes,
and keys (lines, Ctrl-C) typed into it."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable


def read_until(fd: int, done: Callable[[str], bool], timeout_s: float) -> str:
    """What a child process writes to fd (a pipe, or a pseudo-terminal's master end) until done(all of it),
    the child closes it, or timeout_s passes."""
    out, deadline = b"", time.monotonic() + timeout_s
    while not done(out.decode(errors="replace")) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pseudo-terminal whose child has gone
                break
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def with_ctrl_c() -> None:
    """A child's preexec_fn: SIGINT back to its default, so Python turns it into KeyboardInterrupt. A job a shell
    starts in the background (a CI run, say) inherits SIGINT ignored, and so would every child it starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """`python -m runtime.cli ARGS` with a pseudo-terminal as its stdin, stdout and stderr (160 columns);
    term: $TERM ("dumb": no colours or cursor moves, for reading text; "xterm-256color" to see them)."""

    def __init__(self, *args: str, term: str = "dumb"):
        self.fd, child_end = pty.openpty()
        fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
        self.process = subprocess.Popen([sys.executable, "-m", "runtime.cli", *args], stdin=child_end,
                                        stdout=child_end, stderr=child_end, start_new_session=True,
                                        preexec_fn=with_ctrl_c, env={**os.environ, "PYTHONWARNINGS": "ignore", "TERM": term})
        os.close(child_end)
        self.shown = ""  # everything it wrote so far, line ends as "\n"

    def read_until(self, done: Callable[[str], bool], timeout_s: float = 120) -> str:
        """What it writes from now on until done(that text) or timeout_s; line ends as "\n"."""
        start = len(self.shown)
        more = read_until(self.fd, lambda out: done((self.shown + out).replace("\r\n", "\n")[start:]), timeout_s)
        self.shown = (self.shown + more).replace("\r\n", "\n")
        return self.shown[start:]

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def ctrl_c(self) -> None:
        """Ctrl-C as the terminal sends it: SIGINT to the foreground process group."""
        os.killpg(self.process.pid, signal.SIGINT)

    def wait(self, timeout_s: float = 30) -> int:
        self.shown += read_until(self.fd, lambda out: False, 2).replace("\r\n", "\n")
        return self.process.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.fd)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
