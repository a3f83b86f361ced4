"""`speed node`: an edge device's daemon hosting some stages of a cluster's bundle.

Order of start: load and verify the bundle, listen (health NOT_SERVING), run a warm-up forward pass,
report SERVING, then register with the coordinator. SIGTERM (or Ctrl-C) reports NOT_SERVING, lets
in-flight steps finish and stops.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nodes.cpu_quota import CpuQuota
from nodes.host import StageHost
from nodes.link_listener import LinkListener
from nodes.machine import cores_used, this_machine
from nodes.node_metrics import NodeMetrics
from nodes.peer_links import Dialler
from nodes.registration import Registration
from nodes.self_measure import measure_passes, memory_available_bytes
from nodes.service import SERVER_THREADS, NodeService
from runtime.core.bundle import Bundle, load_bundle
from runtime.core.cluster_file import ClusterSpec, NodeSpec, listening_ports, load_cluster, parse_address
from runtime.core.errors import SpeedError
from runtime.executor.cpu_profile import CpuProfile
from runtime.executor.onnx_session import PROVIDERS
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.wire import options
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import SecretCheck, load_secret
from runtime.wire.security import COORDINATOR, check_exposure, link_contexts, node_identity

log = logging.getLogger("speed.node")

SERVICE_NAME = "speed.v1.Node"
STOP_GRACE_S = 2.0


def hostable_stages(bundle: Bundle, node: NodeSpec) -> tuple[int, ...]:
    """The stages a node can run: any when all stages share one graph, else its own and its standby stages."""
    if len(set(bundle.stage_graphs)) == 1:
        return tuple(range(bundle.config.n_stages))
    return tuple(sorted({*node.stages, *node.standby_stages}))


def open_model(bundle: Bundle, node: NodeSpec) -> OnnxStageModel:
    stages = hostable_stages(bundle, node)
    try:
        return OnnxStageModel(bundle, device=node.device, threads=node.threads, stages=stages)
    except SpeedError as exc:
        if node.device == "cpu" or not node.cpu_fallback:
            raise
        log.warning("node %s: %s; running on cpu because the cluster file allows cpu_fallback", node.name, exc)
        return OnnxStageModel(bundle, device="cpu", threads=node.threads, stages=stages)


def profile_to_wire(profile: CpuProfile) -> pb.NodeProfile:
    seconds = profile.seconds
    return pb.NodeProfile(process_cpu_s=time.process_time(), worker_cpu_s=seconds["worker_cpu"], stage_s=seconds["stage"],
                          stage_calls=profile.stage_calls, stage_positions=profile.stage_positions,
                          exit_s=seconds["exit"], guess_s=seconds["guess"], commit_s=seconds["commit"],
                          serialize_s=seconds["serialize"])


def run_node(cluster_path: Path, name: str, *, emulated_link_ms: float | None = None) -> None:
    """The node the cluster file names `name`."""
    stop = stop_on_signals()
    spec = load_cluster(cluster_path)
    node = spec.node(name)
    if emulated_link_ms is not None:
        node = replace(node, emulated_link_ms=emulated_link_ms)
    bundle = load_bundle(spec.bundle, verify=False)
    spec.check_stages(bundle.config.n_stages)
    serve_node(spec, node, bundle, stop)


def stop_on_signals() -> threading.Event:
    """Set by SIGTERM and SIGINT, from the start: a stop during warm-up is still graceful."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def serve_node(spec: ClusterSpec, node: NodeSpec, bundle: Bundle, stop: threading.Event) -> None:
    """Run `node` of the cluster `spec` until `stop` is set (or it is drained)."""
    quota = CpuQuota(node.emulated_cpu_share, f"speed-{spec.name}-{node.name}") if node.emulated_cpu_share else None
    bundle.verify(bundle.files_for(hostable_stages(bundle, node)))  # what this node reads, no more
    model = open_model(bundle, node)
    host = StageHost(model, name=node.name, stages=node.stages, max_sequences=node.max_sequences,
                     idle_timeout_s=node.idle_timeout_s, hostable=hostable_stages(bundle, node))

    # after the quota, which it counts; passes on an accelerator keep no core busy
    machine, cores = this_machine(), cores_used(node.threads) if model.provider == PROVIDERS["cpu"] else 0.0
    measured = [pb.NodeInfo()]  # its pass times, once warm; replaced whole when measured again

    def info() -> pb.NodeInfo:
        reply = pb.NodeInfo(name=node.name, stages=node.stages, bundle_sha256=bundle.sha256, provider=model.provider,
                            threads=node.threads, device=node.device, open_sequences=service.open_sequences,
                            max_sequences=node.max_sequences, emulated_link_ms=node.emulated_link_ms,
                            standby_stages=[s for s in host.hostable if s not in node.stages], hosting=host.stages,
                            incarnation=host.incarnation, profile=profile_to_wire(host.profile),
                            memory_available_bytes=memory_available_bytes(), links=service.link_probe.times(),
                            machine=machine, cores_used=cores, link_port=listener.port)
        reply.MergeFrom(measured[0])
        return reply

    def measured_passes(*, alone: bool) -> list[pb.PassTime]:
        opened_to_time_it = not model.classifier_open
        pass_times, head_ms = measure_passes(model, sorted(host.hostable), alone=alone)
        measured[0] = pb.NodeInfo(pass_times=pass_times, head_ms=head_ms)
        if opened_to_time_it and bundle.config.n_stages - 1 not in host.stages:
            # timed for placement only: this node classifies just for guesses, and the first opens it again
            model.release_classifiers()
        return pass_times

    def measure() -> None:  # on the stage worker, between steps
        pass_times = measured_passes(alone=True)
        log.info("timed its passes again for the coordinator: %s ms a row", ", ".join(
            f"stage {p.stage} {p.ms:.2f}" for p in pass_times if p.rows == 1))

    metrics = NodeMetrics(node.name)
    if node.metrics_port is not None:
        metrics.serve(parse_address(node.address)[0], node.metrics_port)
    identity = node_identity(spec.security, node.name) if spec.security else None
    secret = load_secret(spec)
    if check_exposure(spec, node.address, f"node {node.name}"):
        log.warning("serving %s WITHOUT TLS, as the cluster file allows (insecure: true)", node.address)
    registration: Registration | None = None  # once the node is warm

    def drain() -> pb.DrainReply:
        if registration is None or not registration.registered.is_set():
            stop.set()  # it runs no stage of any coordinator: nothing to hand over
            return pb.DrainReply()
        reply = registration.leave(timeout_s=spec.coordinator.step_timeout_s * (bundle.config.n_stages + 2) + 5)
        log.info("node %s drained: its stages run on %s; stopping", node.name,
                 ", ".join(f"{place.stage} {place.node}" for place in reply.placement))
        stop.set()
        return reply

    link_server_tls, link_client_tls = link_contexts(spec.security, f"node.{node.name}") if spec.security else (None, None)
    service = NodeService(host, info, metrics=metrics, emulated_link_ms=node.emulated_link_ms,
                          only_caller=COORDINATOR if identity else None, prefill_chunk=spec.speculation.prefill_chunk,
                          dial=Dialler(node.name, secret, link_client_tls),
                          drain=drain, measure=measure)
    health_service = health.HealthServicer()
    for service_name in ("", SERVICE_NAME):
        health_service.set(service_name, health_pb2.HealthCheckResponse.NOT_SERVING)
    largest_step = options.step_message_bytes(d_model=bundle.config.d_model, max_positions=spec.speculation.prefill_chunk,
                                              max_items=node.max_sequences * len(host.hostable))
    listener = LinkListener(parse_address(node.address)[0], owner=f"node {node.name}", secret=secret,
                            open_session=service.open_link, max_frame_bytes=largest_step,
                            tls=link_server_tls, port=node.link_port or 0, avoid=frozenset(listening_ports(spec)))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_THREADS),
                         options=options.node_server(largest_step),
                         interceptors=[SecretCheck(secret, f"node {node.name}")])
    pb_grpc.add_NodeServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    options.listen(server, node.address, identity.server(require_client_certificate=True) if identity else None)
    server.start()

    host.warm_up()
    measured_passes(alone=False)
    for service_name in ("", SERVICE_NAME):
        health_service.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    log.info("node %s serving stages %s of %s on %s (%s, %d thread%s)%s", node.name, list(node.stages),
             bundle.manifest["name"], node.address, model.provider, node.threads, "" if node.threads == 1 else "s",
             "".join(["; decode ticks replayed as CUDA graphs" if model.cuda_graphs else "",
                      f"; EMULATING a {node.emulated_link_ms:g} ms one-way link" if node.emulated_link_ms else "",
                      f"; EMULATING a slower device: {node.emulated_cpu_share:g} of one core" if quota else ""]))

    refusal: list[str] = []

    def refused(message: str) -> None:
        refusal.append(message)
        stop.set()

    registration = Registration(spec.coordinator.address, node.address, info, on_registered=service.adopt,
                                on_refused=refused, recent=metrics.recent,
                                credentials=identity.channel() if identity else None, secret=secret,
                                assign_key=service.assign_key)
    registration.start()
    while not stop.wait(timeout=min(node.idle_timeout_s, 5.0)):
        for seq_id in service.expire_idle():
            log.info("freed sequence %d after %g s without a step", seq_id, node.idle_timeout_s)

    registration.stopping.set()
    service.stop_ring()  # ends its links
    listener.close()
    health_service.enter_graceful_shutdown()
    service.step_streams.close()
    server.stop(grace=STOP_GRACE_S).wait()
    service.worker.stop()
    if quota is not None:
        quota.release()
    log.info("node %s stopped", node.name)
    if refusal:
        raise SpeedError(f"the coordinator refused node {node.name}: {refusal[0]}")
