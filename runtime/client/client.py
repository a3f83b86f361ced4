"""Client and AsyncClient: a channel to the coordinator, generate() and status().

`AsyncClient` is the same for asyncio (`async for chunk in client.generate(...)`). Failures raise a
`ClientError` subclass that carries the server's sentence.

With `resume=True` a request survives its coordinator: when the coordinator is lost (or the cluster
cannot serve for a while), the client reconnects within the request's timeout and asks for the rest
after the tokens it already has; the text is the same as an uninterrupted run's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from runtime.client.credentials import credentials_from
from runtime.client.errors import InvalidRequest, client_error
from runtime.client.streams import AsyncGenerationStream, GenerationStream, starter
from runtime.core.chat import ChatMessage
from runtime.core.cluster_file import parse_address
from runtime.core.generation import GenerationOptions
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.generation import request_to_wire
from runtime.wire.security import open_channel

GENERATE_TIMEOUT_S = 600.0
STATUS_TIMEOUT_S = 10.0


class Client:
    """A plain cluster: Client(address). A secure one: Client(address, ca="certs/ca.pem", token=...) or with
    cert= and key= (a client certificate), or the same through SPEED_CA / SPEED_TOKEN / SPEED_CERT / SPEED_KEY."""

    def __init__(self, address: str, *, ca: str | Path | None = None, token: str | None = None,
                 cert: str | Path | None = None, key: str | Path | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        """credentials: ready-made TLS credentials instead of the files (e.g. LocalCluster.credentials())."""
        self.address = checked_address(address)
        self._channel = open_channel(address, credentials or credentials_from(ca, token, cert, key))
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def generate(self, prompt: str, options: GenerationOptions | None = None, *,
                 timeout_s: float = GENERATE_TIMEOUT_S, resume: bool = False, **fields) -> GenerationStream:
        """fields: any of GenerationOptions' (max_new_tokens=32, temperature=0.8, stop=["\\n"], ...), over
        `options`; resume rides out a lost coordinator or a cluster that cannot serve for a while,
        within timeout_s."""
        request = request_to_wire(prompt, (options or GenerationOptions()).replace(**fields))
        return GenerationStream(starter(self._stub, request), address=self.address, timeout_s=timeout_s,
                                resume=resume)

    def chat(self, messages: Sequence[ChatMessage | Mapping[str, str]], options: GenerationOptions | None = None, *,
             timeout_s: float = GENERATE_TIMEOUT_S, resume: bool = False, **fields) -> GenerationStream:
        """The assistant's next answer to a conversation ([{"role": "user", "content": "Hi"}, ...]), which the
        coordinator renders with the model's chat template; otherwise as generate()."""
        request = request_to_wire("", (options or GenerationOptions()).replace(**fields), conversation(messages))
        return GenerationStream(starter(self._stub, request), address=self.address, timeout_s=timeout_s,
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


class AsyncClient:
    def __init__(self, address: str, *, ca: str | Path | None = None, token: str | None = None,
                 cert: str | Path | None = None, key: str | Path | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self.address = checked_address(address)
        self._channel = open_channel(address, credentials or credentials_from(ca, token, cert, key), aio=True)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def generate(self, prompt: str, options: GenerationOptions | None = None, *,
                 timeout_s: float = GENERATE_TIMEOUT_S, resume: bool = False, **fields) -> AsyncGenerationStream:
        """As Client.generate."""
        request = request_to_wire(prompt, (options or GenerationOptions()).replace(**fields))
        return AsyncGenerationStream(starter(self._stub, request), address=self.address, timeout_s=timeout_s,
                                     resume=resume)

    def chat(self, messages: Sequence[ChatMessage | Mapping[str, str]], options: GenerationOptions | None = None, *,
             timeout_s: float = GENERATE_TIMEOUT_S, resume: bool = False, **fields) -> AsyncGenerationStream:
        """As Client.chat."""
        request = request_to_wire("", (options or GenerationOptions()).replace(**fields), conversation(messages))
        return AsyncGenerationStream(starter(self._stub, request), address=self.address, timeout_s=timeout_s,
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


def checked_address(address: str) -> str:
    """The coordinator's address, when it is HOST:PORT; gRPC would take anything and fail only once a request is sent."""
    try:
        parse_address(address if isinstance(address, str) else "")
    except ValueError:
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, (
            f"the coordinator address {address!r} is not a valid HOST:PORT; give the host name or IP address and the "
            "port it listens on, e.g. 127.0.0.1:50050, or [::1]:50050 for an IPv6 address")) from None
    return address


def conversation(messages: Sequence[ChatMessage | Mapping[str, str]]) -> list[ChatMessage]:
    """ChatMessages from ChatMessages or {"role": ..., "content": ...} mappings."""
    return [m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"]) for m in messages]
