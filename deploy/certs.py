"""`speed certs init DIR --cluster FILE`: a certificate authority and one certificate per process.

Everything a secure cluster needs, in one directory (keys and tokens readable by their owner only):

    ca.pem, ca.key                      the cluster's certificate authority
    coordinator.pem, coordinator.key    the coordinator: serves clients and nodes, calls nodes
    node.NAME.pem, node.NAME.key        each node: serves the coordinator, registers with it (and, by
                                        `speed certs add-node NAME`, a node that joins without a line in the file)
    client.pem, client.key              a client certificate (for `client_auth: certificate`)
    client.token                        a client bearer token, whose salted hash is in tokens.txt
    cluster.secret                      what the cluster's processes prove themselves with to each other

A certificate names its process in its common name ("speed coordinator", "speed node edge-1",
"speed client"), which is what the other side checks, and lists the host of the process's address
from the cluster file (and, for a node, its name) as subject alternative names, which is what TLS
checks against the address dialled.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runtime.coordinator.tokens import TOKENS_FILE, add_token
from runtime.core.cluster_file import NODE_NAME, ClusterSpec, parse_address
from runtime.core.errors import SpeedError
from runtime.core.staging import staged_directory
from runtime.wire.cluster_secret import SECRET_FILE, write_secret

CA_DAYS = 3650
CLIENT_NAME = "client"


def common_name(role: str, name: str = "") -> str:
    """What a certificate says its process is: "speed coordinator", "speed node edge-1", "speed client"."""
    return f"speed {role} {name}".strip()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class Authority:
    """A certificate authority that signs the cluster's process certificates."""

    @classmethod
    def load(cls, directory: Path, *, days: int) -> Authority:
        """The authority `speed certs init` wrote to `directory` (ca.pem and ca.key)."""
        try:
            cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise SpeedError(f"{directory} holds no certificate authority of `speed certs init` ({exc}); sign new "
                             "nodes where the cluster's ca.key is") from None
        authority = cls.__new__(cls)
        authority.key, authority.cert, authority.days, authority.name = key, cert, days, cert.subject
        return authority

    def __init__(self, name: str, *, days: int):
        self.key = _key()
        self.days = days
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"speed cluster {name} CA")])
        self.cert = (_builder(self.name, self.name, self.key, CA_DAYS)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False, encipher_only=False,
                                                  decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, directory: Path, stem: str, cn: str, hosts: list[str]) -> None:
        """stem.pem and stem.key: a certificate for both ends of TLS (a process serves and calls)."""
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (_builder(subject, self.name, key, self.days)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False))
        if hosts:
            names = list(dict.fromkeys(hosts))
            builder = builder.add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in names]), critical=False)
        _write_cert(directory / f"{stem}.pem", builder.sign(self.key, hashes.SHA256()))
        _write_key(directory / f"{stem}.key", key)


def add_node_cert(spec: ClusterSpec, name: str, address: str, *, days: int = 365, force: bool = False) -> list[str]:
    """node.NAME.pem and .key for a node the cluster file does not name (`speed node --join`), signed by the
    cluster's authority in its certificates directory; returns the names of the files it needs."""
    if spec.security is None:
        raise SpeedError(f"{spec.source or spec.path} has no security section: its nodes need no certificate, only "
                         "a copy of the cluster's secret")
    if not NODE_NAME.fullmatch(name):
        raise SpeedError(f"a node's name may use only letters, digits, '-', '_' and '.', got {name!r}")
    if name in {node.name for node in spec.nodes}:
        raise SpeedError(f"{name} is a node of {spec.source or spec.path}, which `speed certs init` made a certificate for")
    host = parse_address(address)[0]
    certs = spec.security.certs
    stem = f"node.{name}"
    if (certs / f"{stem}.pem").exists() and not force:
        raise SpeedError(f"{certs / (stem + '.pem')} exists; pass --force to replace it")
    Authority.load(certs, days=days).issue(certs, stem, common_name("node", name), [name, host])
    return ["ca.pem", f"{stem}.pem", f"{stem}.key", SECRET_FILE]


def coordinator_hosts(spec: ClusterSpec) -> list[str]:
    """The names a client may dial the coordinator by: its gRPC address's host and its HTTP API's."""
    addresses = [spec.coordinator.address, spec.coordinator.http_address]
    return [parse_address(address)[0] for address in addresses if address is not None]


def init_certs(out_dir: Path, spec: ClusterSpec, *, days: int = 365, force: bool = False) -> list[str]:
    """Write the directory described above; returns the names of the files written."""
    with staged_directory(out_dir, force=force) as staging:
        staging.chmod(0o700)
        authority = Authority(spec.name, days=days)
        _write_cert(staging / "ca.pem", authority.cert)
        _write_key(staging / "ca.key", authority.key)
        authority.issue(staging, "coordinator", common_name("coordinator"), coordinator_hosts(spec))
        for node in spec.nodes:
            authority.issue(staging, f"node.{node.name}", common_name("node", node.name),
                            [node.name, parse_address(node.address)[0]])
        authority.issue(staging, CLIENT_NAME, common_name(CLIENT_NAME), [])
        token = add_token(staging / TOKENS_FILE, CLIENT_NAME)
        (staging / "client.token").touch(mode=0o600)
        (staging / "client.token").write_text(token + "\n")
        write_secret(staging / SECRET_FILE)
        written = sorted(path.name for path in staging.iterdir())
    out_dir.chmod(0o700)
    return written
