"""The secret a cluster's own processes prove themselves with, plain or TLS: every call between the
coordinator and a node, and between nodes, carries it, and a caller without it is refused before any
handler runs. Clients of the Coordinator service and health checks are not asked for it.

It is 256 random bits in a file only its owner can read, never on a command line or in the environment:
`secret_file` in the cluster file (copied to every machine; `speed certs secret FILE` makes one), else
the certificates directory of a secure cluster, else the cluster's state directory, where `speed up`
makes a new one each time it starts the cluster.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc

from runtime.core.cluster_file import ClusterSpec
from runtime.core.errors import SpeedError

METADATA_KEY = "speed-cluster-secret"
SECRET_FILE = "cluster.secret"
PROTECTED_SERVICES = ("/speed.v1.Node/", "/speed.v1.Registry/")  # the cluster's own; not Coordinator, not health
_HEX_CHARS = 64


def secret_path(spec: ClusterSpec) -> Path:
    if spec.secret_file is not None:
        return spec.secret_file
    if spec.security is not None:
        return spec.security.certs / SECRET_FILE
    return spec.state_dir / SECRET_FILE


def write_secret(path: Path) -> None:
    """A new secret at `path`, readable by its owner only, replacing any there whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".secret-")  # mode 0600
    with os.fdopen(fd, "w") as out:
        out.write(_new_secret())
    os.replace(temporary, path)


def load_secret(spec: ClusterSpec) -> str:
    """The cluster's secret; made where a process of this machine may make it (a certificates or state
    directory), a SpeedError with a sentence where it must come from the operator (secret_file)."""
    path = secret_path(spec)
    if not path.exists():
        if spec.secret_file is not None:
            raise SpeedError(f"secret_file {path} does not exist; make it with `speed certs secret {path}` and copy it "
                             "to every machine of the cluster")
        try:
            _make_once(path)
        except FileExistsError:
            pass  # another process of the cluster made it first
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise SpeedError(f"the cluster secret {path} can be read by others than its owner; chmod 600 {path}")
    text = path.read_text(errors="replace").strip()
    if len(text) != _HEX_CHARS or any(c not in "0123456789abcdef" for c in text):
        raise SpeedError(f"{path} is not a cluster secret ({_HEX_CHARS} hexadecimal digits); make a new one with "
                         f"`speed certs secret {path}` and copy it to every machine of the cluster")
    return text


def _make_once(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(_new_secret())


def _new_secret() -> str:
    return secrets.token_hex(_HEX_CHARS // 2) + "\n"


# --- the caller's side: every call of a channel carries it -----------------------------------------


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression = details.wait_for_ready, getattr(details, "compression", None)
        self.metadata = metadata


def _with_secret(details, secret: str):
    return [*(details.metadata or ()), (METADATA_KEY, secret)]


class SecretCarrier(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """For grpc.intercept_channel: every call of a (synchronous) channel carries the secret."""

    def __init__(self, secret: str):
        self.secret = secret

    def _call(self, continuation, details, request):
        return continuation(_Details(details, _with_secret(details, self.secret)), request)

    intercept_unary_unary = intercept_unary_stream = _call
    intercept_stream_unary = intercept_stream_stream = _call


def secret_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """For the calls of a grpc.aio channel, given with each call (metadata=...): grpc.aio's interceptors of
    streams would wrap every message of the coordinator's step and ring streams in Python."""
    return ((METADATA_KEY, secret),)


# --- the server's side: a call without it never reaches a handler ------------------------------------


def _refusal(owner: str) -> str:
    return (f"{owner} answers only the processes of its cluster, and this call did not carry the cluster's secret; "
            "start every process of the cluster with the same cluster file (a node on another machine reads the "
            "file its secret_file names)")


def refusal_without(sent: str, secret: str, owner: str) -> str:
    """For what is not a gRPC call (a direct link's hello): "" where `sent` is the secret, else the sentence a
    call without it gets."""
    return "" if hmac.compare_digest(sent.encode(), secret.encode()) else _refusal(owner)


def _carries(metadata, secret: str) -> bool:
    sent = next((value for key, value in metadata or () if key == METADATA_KEY), "")
    return hmac.compare_digest(str(sent).encode(), secret.encode())


def _refusing(handler, behaviour: Callable):
    """A handler of the same kind as `handler` whose every call is `behaviour(request_or_iterator, context)`."""
    kind = (handler.request_streaming, handler.response_streaming)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}[kind]
    return make(behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class SecretCheck(grpc.ServerInterceptor):
    """For a synchronous server (a node): the cluster's own services only for callers with the secret."""

    def __init__(self, secret: str, owner: str):
        self.secret, self.message = secret, _refusal(owner)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_SERVICES) \
                or _carries(details.invocation_metadata, self.secret):
            return handler

        def refuse(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, self.message)

        return _refusing(handler, refuse)


class AsyncSecretCheck(grpc.aio.ServerInterceptor):
    """For the asyncio server (the coordinator): the same check."""

    def __init__(self, secret: str, owner: str):
        self.secret, self.message = secret, _refusal(owner)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_SERVICES) \
                or _carries(details.invocation_metadata, self.secret):
            return handler

        async def refuse(_request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.message)

        return _refusing(handler, refuse)
