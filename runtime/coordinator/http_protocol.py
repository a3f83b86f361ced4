"""The HTTP API's connections: uvicorn's h11 protocol with a deadline for a request's headers.

uvicorn waits as long as a client likes for a request line and headers (its keep-alive timeout only runs
between requests, and a byte resets it), so clients that send them a byte at a time could hold every socket
the coordinator has. Here a connection whose request headers are not all in HEADER_TIMEOUT_S after it
opened, or after its last answer, is closed. Bodies and answers are not timed: an answer may stream for as
long as decoding takes.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0  # for a request line and headers; a real client sends them in one packet


class HeaderDeadlineProtocol(H11Protocol):
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole request line and headers have come
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:  # waiting for the next request
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        log.debug("closed a connection from %s: no whole request headers within %g s", self.client, HEADER_TIMEOUT_S)
        self.transport.close()
