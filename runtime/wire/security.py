"""TLS on every hop, from a cluster file's `security` section (the files of `speed certs init`).

- Nodes serve with mutual TLS: only a certificate of the cluster's authority gets a connection, and
  only the coordinator's ("speed coordinator") may call them.
- The coordinator serves with TLS. Clients prove who they are with a bearer token (`client_auth:
  token`) or a client certificate (`client_auth: certificate`: then every caller needs one, since gRPC
  Python cannot ask for a certificate without requiring it). A node proves it is the node it names by
  the certificate it serves with: the coordinator dials the registered address expecting that name.
- A process's certificate names it in its common name; `caller()` reads the peer's.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from runtime.core.cluster_file import ClusterSpec, NodeSpec, SecuritySpec, parse_address
from runtime.core.errors import SpeedError
from runtime.wire.cluster_secret import SecretCarrier, load_secret
from runtime.wire.options import CHANNEL

COORDINATOR = "speed coordinator"
CLIENT = "speed client"


def node_common_name(name: str) -> str:
    return f"speed node {name}"


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise SpeedError(f"{path} does not exist; make the cluster's certificates with "
                         f"`speed certs init {path.parent} --cluster FILE`")
    return path.read_bytes()


@dataclass(frozen=True)
class Identity:
    """A process's certificate and key, and the authority whose certificates it trusts."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, security: SecuritySpec, stem: str) -> Identity:
        """stem: "coordinator", "client" or "node.NAME", as `speed certs init` names the files."""
        certs = security.certs
        return cls(ca=_read(certs / "ca.pem"), cert=_read(certs / f"{stem}.pem"), key=_read(certs / f"{stem}.key"))

    def server(self, *, require_client_certificate: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=require_client_certificate)

    def channel(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)


def node_identity(security: SecuritySpec, name: str) -> Identity:
    return Identity.load(security, f"node.{name}")


def link_contexts(security: SecuritySpec, stem: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """TLS for the direct links of the process whose certificate is `stem` ("node.NAME", or "coordinator",
    which only dials): the context its listener serves with (nodes/link_listener.py) and the one it dials
    with (nodes/peer_links.py, runtime/coordinator/ring_link.py). Each end shows its certificate and takes
    only certificates of the cluster's authority; who the peer is, its certificate's common name says
    (`certificate_name`), as `caller()` does for gRPC."""
    ca, cert, key = (security.certs / f for f in ("ca.pem", f"{stem}.pem", f"{stem}.key"))
    for path in (ca, cert, key):
        _read(path)  # a missing file is named in a sentence
    contexts = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for context in contexts:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
    contexts[1].check_hostname = False  # the peer's common name is checked instead: node names need not be hosts
    return contexts


def certificate_name(connection: ssl.SSLSocket | ssl.SSLObject) -> str:
    """The common name of the certificate the other end of a TLS connection showed; "" without one."""
    subject = (connection.getpeercert() or {}).get("subject", ())
    return next((value for rdn in subject for key, value in rdn if key == "commonName"), "")


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None, *, server_name: str | None = None,
                 aio: bool = False, secret: str | None = None):
    """A channel with every channel's options: plain without credentials, TLS with them; server_name: the
    name the server's certificate must hold, when it is not the dialled host; aio: a grpc.aio channel (its
    calls carry the cluster's secret with secret_metadata); secret: the cluster's, carried by every call of
    a synchronous channel (one of the cluster's own processes)."""
    options = CHANNEL + (expect_name(server_name) if credentials is not None and server_name else [])
    channels = grpc.aio if aio else grpc
    channel = channels.insecure_channel(address, options=options) if credentials is None \
        else channels.secure_channel(address, credentials, options=options)
    return grpc.intercept_channel(channel, SecretCarrier(secret)) if secret and not aio else channel


def member_channel(spec: ClusterSpec, address: str) -> grpc.Channel:
    """A channel to a process of a plain cluster as the cluster's own processes open it, carrying its secret
    (for an operator's tools on the cluster's machine, e.g. reading a node's Info)."""
    return open_channel(address, secret=load_secret(spec))


def operator_channel(spec: ClusterSpec, node: NodeSpec) -> grpc.Channel:
    """A channel to a node as an operator's tools on the cluster's machine read it (its Info): with the secret, and
    in a secure cluster with the coordinator's certificate, the only one a node answers."""
    if spec.security is None:
        return member_channel(spec, node.address)
    return open_channel(node.address, Identity.load(spec.security, "coordinator").channel(), server_name=node.name,
                        secret=load_secret(spec))


def expect_name(name: str) -> list[tuple[str, str]]:
    """Channel options that make TLS check the server's certificate against `name`, not the dialled host."""
    return [("grpc.ssl_target_name_override", name)]


def caller(context) -> str:
    """The common name of the peer's certificate; "" without one (works for sync and asyncio contexts)."""
    names = (context.auth_context() or {}).get("x509_common_name") or [b""]
    return names[0].decode(errors="replace")


def client_credentials(ca: bytes, *, token: str | None = None, cert: bytes | None = None,
                       key: bytes | None = None) -> grpc.ChannelCredentials:
    """What a client presents to a secure coordinator: its CA, and a bearer token or a certificate."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return credentials


def is_loopback(address: str) -> bool:
    host, _ = parse_address(address)
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(spec: ClusterSpec, address: str, owner: str) -> bool:
    """Refuse to serve `address` in the clear unless it is loopback or the cluster file says `insecure:
    true`; True when it will be served in the clear on another address (worth a warning)."""
    if spec.security is not None or is_loopback(address):
        return False
    if not spec.insecure:
        raise SpeedError(f"{owner} would listen on {address} without TLS; add a security section to "
                         f"{spec.source or spec.path} (see `speed certs init`), or set `insecure: true` if this "
                         "network is trusted")
    return True


def operator_credentials(security: SecuritySpec) -> grpc.ChannelCredentials:
    """The client identity `speed certs init` made (its token, or its certificate where the cluster asks for
    one): what `speed up` uses to watch the cluster it started."""
    certs = security.certs
    if security.client_auth == "certificate":
        return client_credentials(_read(certs / "ca.pem"), cert=_read(certs / "client.pem"), key=_read(certs / "client.key"))
    return client_credentials(_read(certs / "ca.pem"), token=_read(certs / "client.token").decode().strip())
