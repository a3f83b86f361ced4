"""The coordinator's Steps streams open on a node, so that a stopping node ends them without waiting out its
grace: gRPC's grace waits for every call still open, and the coordinator keeps its step stream open between
steps, so even an idle node took the whole grace to stop. A stream waiting for its next message is ended at
once; one running a step answers it first and ends after."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TypeVar

import grpc

Message = TypeVar("Message")


class StepStreams:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: set[grpc.ServicerContext] = set()
        self._closed = False

    def messages(self, requests: Iterator[Message], context: grpc.ServicerContext) -> Iterator[Message]:
        """The messages of one stream, until its caller ends it or the node stops between two of them."""
        while True:
            with self._lock:
                if self._closed:
                    return
                self._waiting.add(context)
            try:
                message = next(requests, None)
            finally:
                with self._lock:
                    self._waiting.discard(context)
            if message is None:
                return
            yield message

    def close(self) -> None:
        """End every stream waiting for a message now, and every other once its step is answered."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, set()
        for context in waiting:
            context.cancel()
