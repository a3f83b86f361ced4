"""The channel to a coordinator: plain, or TLS with the cluster's CA and, where asked, a token or a
client certificate."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from runtime.core.errors import SpeedError
from runtime.wire.security import client_credentials


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
    return client_credentials(_certificates(ca, "CA certificate", "ca.pem"), token=token,
                              cert=cert and _certificates(cert, "client certificate", "client.pem"),
                              key=key and _private_key(key))


def _certificates(path: str | Path, what: str, made_as: str) -> bytes:
    """The file's bytes, when it holds PEM certificates; gRPC would log its own lines and then fail to connect."""
    from cryptography import x509

    data = _file(path, what)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise SpeedError(f"the {what} {path} is not a PEM certificate (a -----BEGIN CERTIFICATE----- block, like the "
                         f"{made_as} that `speed certs init` writes)") from None
    return data


def _private_key(path: str | Path) -> bytes:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _file(path, "client key")
    try:
        load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: the key is encrypted
        raise SpeedError(f"the client key {path} is not a PEM private key without a passphrase (a -----BEGIN PRIVATE "
                         "KEY----- block, like the client.key that `speed certs init` writes)") from None
    return data


def _file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SpeedError(f"cannot read the {what} {path}: {exc.strerror}") from None


