"""The client SDK: `Client(address).generate(prompt)` streams the generated text, then the result.

    from runtime.client import Client
    with Client("127.0.0.1:50050") as client:
        stream = client.generate("ROMEO:", max_new_tokens=32)
        for chunk in stream:
            print(chunk.text, end="", flush=True)
        print(stream.result().stats)

`AsyncClient` is the same for asyncio (`async for chunk in client.generate(...)`). Failures raise a
`ClientError` subclass that carries the server's sentence.

With `resume=True` a request survives its coordinator: when the coordinator is lost (or the cluster
cannot serve for a while), the client reconnects within the request's timeout and asks for the rest
after the tokens it already has; the text is the same as an uninterrupted run's.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from runtime.errors import SpeedError
from runtime.wire import options
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.security import client_credentials

GENERATE_TIMEOUT_S = 600.0
STATUS_TIMEOUT_S = 10.0
RESUME_BACKOFF_S = (0.2, 2.0)  # first and longest wait between tries of a resumed request


class ClientError(SpeedError):
    """A request the cluster did not complete; `code` is the gRPC status, the message the server's sentence."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidRequest(ClientError):
    """The request itself is wrong (empty or too long prompt, sampling out of range): fix it, do not retry."""


class Unavailable(ClientError):
    """The cluster cannot serve now (a node is down, the coordinator unreachable): retry later."""


class DeadlineExceeded(ClientError):
    """The request took longer than its timeout."""


class Busy(ClientError):
    """Every sequence slot is taken and the queue is full: retry later."""


class Unauthenticated(ClientError):
    """The cluster does not know this client: a token or client certificate is missing or wrong."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Busy,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
}


def from_coordinator(exc: grpc.RpcError) -> bool:
    """The coordinator itself sent this error (with a sentence), rather than the network or gRPC."""
    return options.sent_by(exc, "coordinator")


def client_error(exc: grpc.RpcError, address: str = "", timeout_s: float | None = None) -> ClientError:
    code, message = exc.code(), exc.details() or exc.code().name
    if not from_coordinator(exc):
        if code == grpc.StatusCode.UNAVAILABLE and ("handshake" in message.lower() or "ssl" in message.lower()):
            message = (f"TLS with the coordinator {address} failed ({message}); check the CA certificate (--ca), and "
                       "give a client certificate (--cert, --key) where the cluster asks for one")
        elif code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in message.lower():
            message = (f"cannot reach the coordinator {address} ({message}); is the cluster up, and if it is a secure "
                       "one, were its CA (--ca) and, where it asks for one, a client certificate (--cert, --key) given?")
        elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            code, message = grpc.StatusCode.UNAVAILABLE, (
                f"lost the coordinator {address} during the request ({message}); it stopped or restarted: retry, "
                "or pass resume=True to continue where the request stopped")
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s is not None:
            message = (f"the request did not finish within its {timeout_s:g} s timeout; give it a longer timeout "
                       "or ask for fewer tokens")
    return _ERRORS.get(code, ClientError)(code, message)


@dataclass(frozen=True)
class Chunk:
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    stop_reason: str
    prompt_tokens: int
    time_to_first_token_ms: float
    tokens_per_s: float
    speculative: bool
    provider: str
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_wire(cls, finished: pb.Finished) -> GenerationResult:
        stats = finished.stats
        return cls(text=finished.text, token_ids=list(finished.token_ids), stop_reason=finished.stop_reason,
                   prompt_tokens=finished.prompt_tokens, time_to_first_token_ms=finished.time_to_first_token_ms,
                   tokens_per_s=finished.tokens_per_s, speculative=finished.speculative, provider=finished.provider,
                   stats={"ticks": stats.ticks, "committed": stats.committed,
                          "flips_per_boundary": [round(x, 4) for x in stats.flips_per_boundary],
                          "flushed_steps": stats.flushed_steps, "mean_in_flight": round(stats.mean_in_flight, 3)})

    def to_json(self) -> dict:
        """The keys of `speed reference --json`."""
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.token_ids),
            "stop_reason": self.stop_reason,
            "time_to_first_token_ms": round(self.time_to_first_token_ms, 2),
            "backend": "onnx",
            "provider": self.provider,
            "speculative": self.speculative,
            "stats": self.stats,
        }


def generate_request(prompt: str, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int,
                     stop: Sequence[str], speculative: bool | None, ignore_eos: bool, chat: bool,
                     plain_guesses: bool) -> pb.GenerateRequest:
    request = pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos,
                                 chat=chat, plain_guesses=plain_guesses,
                                 sampling=pb.Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    if speculative is not None:
        request.speculative = speculative
    return request


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
            self._result = GenerationResult.from_wire(event.finished)
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


def _starter(stub: pb_grpc.CoordinatorStub, request: pb.GenerateRequest):
    """A function that (re)starts the request, resumed after a continuation."""

    def start(continuation: pb.Continuation, timeout_s: float, wait_for_ready: bool):
        request.continuation.CopyFrom(continuation)
        return stub.Generate(request, timeout=timeout_s, wait_for_ready=wait_for_ready)

    return start


def credentials_from(ca: str | Path | None, token: str | None, cert: str | Path | None,
                     key: str | Path | None) -> grpc.ChannelCredentials | None:
    """TLS credentials for a secure cluster, or None for a plain one. Unset arguments come from the
    environment: SPEED_CA, SPEED_TOKEN, SPEED_CERT, SPEED_KEY."""
    ca, token = ca or os.environ.get("SPEED_CA"), token or os.environ.get("SPEED_TOKEN")
    cert, key = cert or os.environ.get("SPEED_CERT"), key or os.environ.get("SPEED_KEY")
    if not ca:
        if token or cert or key:
            raise SpeedError("a token or a client certificate needs the cluster's CA certificate too (ca=... or "
                             "--ca or SPEED_CA), so that the coordinator is checked before anything is sent")
        return None
    if bool(cert) != bool(key):
        raise SpeedError("a client certificate needs its key too, and a key its certificate")
    return client_credentials(_file(ca, "CA certificate"), token=token, cert=cert and _file(cert, "client certificate"),
                              key=key and _file(key, "client key"))


def _file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SpeedError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _open(address: str, credentials: grpc.ChannelCredentials | None, channel_module=grpc):
    if credentials is None:
        return channel_module.insecure_channel(address, options=options.CHANNEL)
    return channel_module.secure_channel(address, credentials, options=options.CHANNEL)


class Client:
    """A plain cluster: Client(address). A secure one: Client(address, ca="certs/ca.pem", token=...) or with
    cert= and key= (a client certificate), or the same through SPEED_CA / SPEED_TOKEN / SPEED_CERT / SPEED_KEY."""

    def __init__(self, address: str, *, ca: str | Path | None = None, token: str | None = None,
                 cert: str | Path | None = None, key: str | Path | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        """credentials: ready-made TLS credentials instead of the files (e.g. LocalCluster.credentials())."""
        self.address = address
        self._channel = _open(address, credentials or credentials_from(ca, token, cert, key))
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def generate(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), speculative: bool | None = None,
                 ignore_eos: bool = False, chat: bool = False, plain_guesses: bool = False,
                 timeout_s: float = GENERATE_TIMEOUT_S, resume: bool = False) -> GenerationStream:
        """speculative None uses the cluster's setting; ignore_eos decodes max_new_tokens (for benchmarks);
        chat treats the prompt as a user's message and applies the model's chat template; plain_guesses
        ignores the bundle's exit adapters (same text, for comparison); resume rides out a lost
        coordinator or a cluster that cannot serve for a while, within timeout_s."""
        request = generate_request(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, seed=seed, stop=stop, speculative=speculative, ignore_eos=ignore_eos,
                                   chat=chat, plain_guesses=plain_guesses)
        return GenerationStream(_starter(self._stub, request), address=self.address, timeout_s=timeout_s,
                                resume=resume)

    def status(self, *, timeout_s: float = STATUS_TIMEOUT_S) -> pb.ClusterStatusReply:
        try:
            return self._stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise client_error(exc, self.address) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


class AsyncClient:
    def __init__(self, address: str, *, ca: str | Path | None = None, token: str | None = None,
                 cert: str | Path | None = None, key: str | Path | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self.address = address
        self._channel = _open(address, credentials or credentials_from(ca, token, cert, key), grpc.aio)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def generate(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), speculative: bool | None = None,
                 ignore_eos: bool = False, chat: bool = False, plain_guesses: bool = False,
                 timeout_s: float = GENERATE_TIMEOUT_S, resume: bool = False) -> AsyncGenerationStream:
        request = generate_request(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, seed=seed, stop=stop, speculative=speculative, ignore_eos=ignore_eos,
                                   chat=chat, plain_guesses=plain_guesses)
        return AsyncGenerationStream(_starter(self._stub, request), address=self.address, timeout_s=timeout_s,
                                     resume=resume)

    async def status(self, *, timeout_s: float = STATUS_TIMEOUT_S) -> pb.ClusterStatusReply:
        try:
            return await self._stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise client_error(exc, self.address) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
