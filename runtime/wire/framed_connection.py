"""A link's connection as its listening end uses it: frames read by one thread while any thread may write
frames, on plain TCP or TLS.

OpenSSL forbids a read and a write on one TLS connection at the same time (a blocked read would hold
the connection), so the socket is non-blocking and every call into it holds `_io` for the moment it
takes: a reader or a writer that must wait for the network waits in poll(), without the lock. Writers
also hold `_writing` from a frame's first byte to its last, so that frames never interleave and a write
that TLS asked to repeat is repeated before any other."""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time

from runtime.core.errors import SpeedError
from runtime.wire.frames import CUT_SHORT, LENGTH, frame_length

RECEIVE_BYTES = 1 << 16
CROSS_WAIT_S = 0.01  # TLS asked a write to read first, or a read to write: the other thread may take that turn


class FramedConnection:
    def __init__(self, connection: socket.socket, *, send_timeout_s: float):
        """connection: connected (TLS: its handshake done); from now on only this object uses it."""
        connection.setblocking(False)
        self._connection = connection
        self._send_timeout_s = send_timeout_s
        self._io = threading.Lock()
        self._writing = threading.Lock()
        self._received = bytearray()
        self._readable, self._writable = select.poll(), select.poll()
        self._readable.register(connection, select.POLLIN)
        self._writable.register(connection, select.POLLOUT)

    def read_frame(self, max_bytes: int, *, timeout_s: float | None = None) -> bytes | None:
        """The next frame (by the one reading thread); None where the connection ends between frames;
        SpeedError for a frame longer than max_bytes (not read) or cut short; TimeoutError after timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(self._received) < LENGTH.size:
            if not self._receive(deadline):
                if self._received:
                    raise SpeedError(CUT_SHORT)
                return None
        end = LENGTH.size + frame_length(self._received, max_bytes)
        while len(self._received) < end:
            if not self._receive(deadline):
                raise SpeedError(CUT_SHORT)
        payload = bytes(self._received[LENGTH.size:end])
        del self._received[:end]
        return payload

    def send(self, data: bytes) -> None:
        """Write whole frames (from any thread); OSError where the connection broke or took nothing for
        send_timeout_s."""
        deadline = time.monotonic() + self._send_timeout_s
        left = memoryview(data)
        with self._writing:
            while left:
                with self._io:
                    try:
                        left = left[self._connection.send(left):]
                        continue
                    except (ssl.SSLWantWriteError, BlockingIOError):
                        waiting_for = self._writable
                    except ssl.SSLWantReadError:
                        waiting_for = None
                self._wait(waiting_for, deadline, "sending")

    def linger(self, timeout_s: float) -> None:
        """Write no more, and read what the peer still sends until it stops (timeout_s at most), so that closing
        does not reset the connection and lose what was written last."""
        with self._io:
            try:
                self._connection.shutdown(socket.SHUT_WR)
            except OSError:
                return
        deadline = time.monotonic() + timeout_s
        try:
            while self._receive(deadline):
                self._received.clear()
        except TimeoutError:
            pass

    def end(self) -> None:
        """End the connection (from any thread): its reader sees the end, a writer an error; the reader closes it.
        Under the lock: a TLS socket shut down forgets its encryption, which a write meanwhile would skip."""
        with self._io:
            try:
                self._connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected any more

    def _receive(self, deadline: float | None) -> bool:
        """More bytes into the buffer, waiting for them; False where the connection ended. It waits before it reads
        (one system call fewer a message than reading first), unless TLS holds bytes it decrypted already."""
        waiting_for: select.poll | None = self._readable
        while True:
            if waiting_for is not self._readable or not self._decrypted():
                self._wait(waiting_for, deadline, "reading")
            with self._io:
                try:
                    data = self._connection.recv(RECEIVE_BYTES)
                except (ssl.SSLWantReadError, BlockingIOError):  # e.g. only part of a TLS record came
                    data, waiting_for = None, self._readable
                except ssl.SSLWantWriteError:
                    data, waiting_for = None, None
            if data is not None:
                self._received += data
                return bool(data)

    def _decrypted(self) -> bool:
        if not isinstance(self._connection, ssl.SSLSocket):
            return False
        with self._io:
            return self._connection.pending() > 0

    def _wait(self, poll: select.poll | None, deadline: float | None, doing: str) -> None:
        """Until the connection is ready (poll), or for CROSS_WAIT_S (None); TimeoutError past the deadline."""
        wait_s = None if deadline is None else deadline - time.monotonic()
        if wait_s is not None and wait_s <= 0:
            raise TimeoutError(f"the link took too long {doing}")
        if poll is None:
            time.sleep(CROSS_WAIT_S if wait_s is None else min(wait_s, CROSS_WAIT_S))
        else:
            poll.poll(None if wait_s is None else max(1, round(wait_s * 1000)))
