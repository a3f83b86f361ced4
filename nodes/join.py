"""`speed node --join COORDINATOR`: a node that no cluster file names joins a running cluster. It proves
itself as every node does (the cluster's secret, and in a secure cluster a certificate of the cluster's
authority for its name, from `speed certs add-node`), asks the coordinator for the cluster's settings, then
serves as any node: no stage of its own, any stage it holds when the coordinator's placement gives it one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from nodes.daemon import serve_node, stop_on_signals
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import ClusterSpec, CoordinatorSpec, NodeSpec, SecuritySpec, SpeculationSpec
from runtime.core.errors import SpeedError
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import SECRET_FILE, load_secret
from runtime.wire.security import node_identity, open_channel

SETTINGS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Joining:
    """What `speed node --join` is told on its command line."""

    coordinator: str  # host:port
    name: str
    address: str  # where it serves
    bundle: Path
    certs: Path | None = None  # ca.pem and node.NAME.pem/.key (`speed certs add-node`); None: a plain cluster
    secret_file: Path | None = None  # the cluster's secret; None: the certificates directory's
    threads: int = 1
    max_sequences: int = 8
    link_port: int | None = None  # where other nodes' direct links come in; None: any free port


def join_cluster(joining: Joining) -> None:
    stop = stop_on_signals()
    spec = joining_spec(joining)
    settings = cluster_settings(spec)
    bundle = load_bundle(joining.bundle, verify=False)
    if bundle.sha256 != settings.bundle_sha256:
        raise SpeedError(f"the bundle at {joining.bundle} is {bundle.sha256[:12]} but cluster {settings.cluster} "
                         f"serves {settings.bundle_sha256[:12]}; give the node the cluster's bundle")
    spec = ClusterSpec(name=settings.cluster, path=spec.path, bundle=spec.bundle,
                       coordinator=CoordinatorSpec(joining.coordinator, step_timeout_s=settings.step_timeout_s),
                       speculation=SpeculationSpec(prefill_chunk=settings.prefill_chunk), nodes=spec.nodes,
                       source=spec.source, security=spec.security, insecure=settings.insecure,
                       secret_file=spec.secret_file)
    node = spec.nodes[0]
    serve_node(spec, node, bundle, stop)


def joining_spec(joining: Joining) -> ClusterSpec:
    """The cluster as far as the command line tells: enough to reach the coordinator as this node."""
    if joining.certs is None and joining.secret_file is None:
        raise SpeedError("a joining node proves itself with the cluster's secret: give --secret-file (a copy of the "
                         "cluster's secret file), or --certs with a directory holding it")
    secret_file = joining.secret_file or joining.certs / SECRET_FILE
    stages = tuple(range(load_bundle(joining.bundle, verify=False).config.n_stages))
    node = NodeSpec(name=joining.name, address=joining.address, stages=(), standby_stages=stages,
                    threads=joining.threads, max_sequences=joining.max_sequences, link_port=joining.link_port)
    # no cluster file here: `path` only names the state directory and messages, `source` says what it is
    return ClusterSpec(name="joining", path=secret_file.resolve(), bundle=joining.bundle.resolve(),
                       coordinator=CoordinatorSpec(joining.coordinator), speculation=SpeculationSpec(), nodes=(node,),
                       source=f"the cluster of coordinator {joining.coordinator}",
                       security=SecuritySpec(certs=joining.certs.resolve()) if joining.certs else None,
                       secret_file=secret_file.resolve())


def cluster_settings(spec: ClusterSpec) -> pb.ClusterSettings:
    node = spec.nodes[0]
    identity = node_identity(spec.security, node.name) if spec.security else None
    with open_channel(spec.coordinator.address, identity.channel() if identity else None,
                      secret=load_secret(spec)) as channel:
        try:
            settings = pb_grpc.RegistryStub(channel).Settings(pb.SettingsRequest(), timeout=SETTINGS_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise SpeedError(f"could not ask the coordinator at {spec.coordinator.address} to join its cluster "
                             f"({exc.code().name}: {exc.details()}); check the address, the secret and, in a "
                             "secure cluster, --certs") from None
    if settings.secure != (identity is not None):
        need = "give --certs with the node's certificate (speed certs add-node)" if settings.secure else "leave out --certs"
        raise SpeedError(f"cluster {settings.cluster} {'uses' if settings.secure else 'does not use'} TLS between its "
                         f"processes; {need}")
    return settings
