"""Failures of a request as the caller sees them: one ClientError subclass per thing to do about it,
carrying the server's sentence, or one of ours where the network or gRPC spoke instead."""

from __future__ import annotations

import grpc

from runtime.core.errors import SpeedError
from runtime.wire import options


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
UNRESOLVED = ("errors resolving", "dns resolution failed")  # how gRPC's resolvers say a host name found no address


def from_coordinator(exc: grpc.RpcError) -> bool:
    """The coordinator itself sent this error (with a sentence), rather than the network or gRPC."""
    return options.sent_by(exc, "coordinator")


def client_error(exc: grpc.RpcError, address: str = "", timeout_s: float | None = None) -> ClientError:
    code, message = exc.code(), exc.details() or exc.code().name
    if not from_coordinator(exc):
        if code == grpc.StatusCode.UNAVAILABLE and ("handshake" in message.lower() or "ssl" in message.lower()):
            message = (f"TLS with the coordinator {address} failed ({message}); check the CA certificate (--ca), and "
                       "give a client certificate (--cert, --key) where the cluster asks for one")
        elif code == grpc.StatusCode.UNAVAILABLE and any(words in message.lower() for words in UNRESOLVED):
            message = (f"cannot resolve the host of the coordinator address {address} ({message}); check the host name, "
                       "or give the coordinator's IP address")
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
