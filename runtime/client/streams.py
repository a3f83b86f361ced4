"""A request's stream of events: chunks of text as they are committed, then the result; after a lost
coordinator a resumed stream asks for what comes after the chunks it already has."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import grpc

from runtime.client.errors import client_error, from_coordinator
from runtime.core.generation import GenerationResult
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.generation import result_from_wire

RESUME_BACKOFF_S = (0.2, 2.0)  # first and longest wait between tries of a resumed request


@dataclass(frozen=True)
class Chunk:
    token_ids: list[int]
    text: str


class _Events:
    """What both streams do with the server's events: chunks pass on, the final one becomes the result;
    after a lost coordinator, a resumed call asks for what comes after the chunks already received."""

    def __init__(self, start: Callable[[pb.Continuation, float, bool], object], *, address: str, timeout_s: float,
                 resume: bool):
        self._start = start  # (continuation, timeout, wait for the channel) -> a call
        self._address, self._timeout_s, self._resume = address, timeout_s, resume
        self._deadline = time.monotonic() + timeout_s
        self._token_ids: list[int] = []
        self._text_chars = 0
        self._tries = 0
        self._call = start(pb.Continuation(), timeout_s, False)
        self._result: GenerationResult | None = None

    def _chunk(self, event: pb.GenerateEvent) -> Chunk | None:
        if event.HasField("finished"):
            self._result = result_from_wire(event.finished)
            return None
        self._token_ids += event.tokens.token_ids
        self._text_chars += len(event.tokens.text)
        self._tries = 0  # progress: the next outage starts its backoff afresh
        return Chunk(list(event.tokens.token_ids), event.tokens.text)

    def _resume_after(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before resuming after `exc`; raises the ClientError when `exc` ends the request."""
        left = self._deadline - time.monotonic()
        lost = exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and not from_coordinator(exc)
        if not self._resume or left <= 0 or not (exc.code() == grpc.StatusCode.UNAVAILABLE or lost):
            raise client_error(exc, self._address, self._timeout_s) from None
        first, longest = RESUME_BACKOFF_S
        self._tries += 1
        return min(first * 2 ** (self._tries - 1), longest, left)

    def _restart(self) -> None:
        continuation = pb.Continuation(token_ids=self._token_ids, text_chars=self._text_chars)
        self._call = self._start(continuation, max(self._deadline - time.monotonic(), 0.001), True)

    def cancel(self) -> None:
        self._call.cancel()


class GenerationStream(_Events):
    """Iterate for the text as it is committed; `result()` waits for the end and returns the whole answer."""

    def __iter__(self) -> Iterator[Chunk]:
        while self._result is None:
            try:
                for event in self._call:
                    if (chunk := self._chunk(event)) is not None:
                        yield chunk
                return
            except grpc.RpcError as exc:
                time.sleep(self._resume_after(exc))
                self._restart()

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        return self._result


def starter(stub: pb_grpc.CoordinatorStub, request: pb.GenerateRequest):
    """A function that (re)starts the request, resumed after a continuation."""

    def start(continuation: pb.Continuation, timeout_s: float, wait_for_ready: bool):
        request.continuation.CopyFrom(continuation)
        return stub.Generate(request, timeout=timeout_s, wait_for_ready=wait_for_ready)

    return start


class AsyncGenerationStream(_Events):
    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while self._result is None:
            try:
                async for event in self._call:
                    if (chunk := self._chunk(event)) is not None:
                        yield chunk
                return
            except grpc.RpcError as exc:
                await asyncio.sleep(self._resume_after(exc))
                self._restart()

    async def result(self) -> GenerationResult:
        async for _ in self:
            pass
        return self._result
