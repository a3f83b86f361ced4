"""`speed node --drain`: ask a running node, as itself (its certificate, the cluster's secret), to hand its
stages over to the other nodes and stop, so that it leaves without a failover."""

from __future__ import annotations

from pathlib import Path

import grpc

from nodes.join import Joining, joining_spec
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import ClusterSpec, load_cluster
from runtime.core.errors import SpeedError
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import load_secret
from runtime.wire.security import node_identity, open_channel

MARGIN_S = 10.0  # beyond the coordinator's own bound on moving the stages
JOINED_TIMEOUT_S = 600.0  # a joined node's: its command line does not say the cluster's step timeout


def drain_node(cluster_path: Path, name: str) -> pb.DrainReply:
    """Where every stage runs once the node of the cluster file has left; SpeedError with a sentence when it
    cannot leave."""
    spec = load_cluster(cluster_path)
    n_stages = load_bundle(spec.bundle, verify=False).config.n_stages
    return _drain(spec, name, spec.coordinator.step_timeout_s * (n_stages + 2) + MARGIN_S)  # the coordinator's bound


def drain_joined(joining: Joining) -> pb.DrainReply:
    """The same for a node that joined with `speed node --join`, told the same flags."""
    return _drain(joining_spec(joining), joining.name, JOINED_TIMEOUT_S)


def _drain(spec: ClusterSpec, name: str, timeout_s: float) -> pb.DrainReply:
    node = spec.node(name)
    identity = node_identity(spec.security, name) if spec.security else None
    with open_channel(node.address, identity.channel() if identity else None, server_name=name,
                      secret=load_secret(spec)) as channel:
        try:
            return pb_grpc.NodeStub(channel).Drain(pb.DrainRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise SpeedError(f"node {name} is not running at {node.address}") from None
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the node's or the coordinator's own sentence
                raise SpeedError(exc.details()) from None
            raise SpeedError(f"node {name} did not drain ({exc.code().name}: {exc.details()})") from None
