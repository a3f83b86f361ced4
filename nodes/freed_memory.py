"""Memory a refused message used, given back to the operating system soon after (glibc's malloc)."""

from __future__ import annotations

import ctypes
import threading

TRIM_DELAY_S = 0.5  # a burst of refused messages costs one trim
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_BYTES = 1024 * 1024  # blocks this large are mapped on their own and unmapped when freed
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024  # free memory this large at the top of a heap goes back at once


class FreedMemory:
    """Gives the memory a refused message used back to the operating system, soon after.

    A message is parsed in whichever of gRPC's threads received it. By default glibc raises its mmap
    threshold to the size of any large block freed (up to 32 MB, the trim threshold to twice that), so
    later buffers of big messages are carved out of the receiving thread's heap and stay resident once
    freed; malloc_trim does not shrink the top of those heaps, so the thresholds are fixed as well (what
    each step saved is in docs/performance.md). malloc_trim takes tens of milliseconds, so it runs once
    per burst of refusals, on a timer, not once per message. The thresholds are set for the whole
    process (a node's)."""

    def __init__(self, delay_s: float = TRIM_DELAY_S):
        self._delay_s = delay_s
        self._lock = threading.Lock()
        self._pending = False
        try:
            libc = ctypes.CDLL(None)
            self._trim = libc.malloc_trim  # glibc only; elsewhere nothing to do
            self._trim.argtypes, self._trim.restype = [ctypes.c_size_t], ctypes.c_int
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)  # fixed: no longer raised by what is freed
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        except (OSError, AttributeError):
            self._trim = None

    def release_soon(self) -> None:
        if self._trim is None:
            return
        with self._lock:
            if self._pending:
                return
            self._pending = True
        timer = threading.Timer(self._delay_s, self._release)
        timer.daemon = True
        timer.start()

    def _release(self) -> None:
        with self._lock:
            self._pending = False
        self._trim(0)
