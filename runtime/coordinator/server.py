"""`speed coordinator`: the gRPC front door (the Coordinator service for clients, the Registry for nodes,
gRPC health) and the process that serves it, with the OpenAI-compatible HTTP API where the cluster file
asks for one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from runtime.coordinator.coordinator import Coordinator, Unverified
from runtime.coordinator.remote_node import MAX_MEMORY_BYTES, MAX_POSITIONS_PER_S, MAX_STEP_MS
from runtime.coordinator.requests import Request
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import DataPathKind, load_cluster, parse_address
from runtime.core.errors import SpeedError
from runtime.core.node_state import NodeState
from runtime.core.request import FailureKind, RequestFailed
from runtime.wire import options
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import AsyncSecretCheck
from runtime.wire.generation import event_to_wire, request_from_wire
from runtime.wire.security import CLIENT, caller, check_exposure, node_common_name

log = logging.getLogger("speed.coordinator")

STOP_GRACE_S = 2.0
DEADLINE_MARGIN_S = 0.05  # answer a little before the client's own deadline, so it gets our sentence
STATUS_CODES = {FailureKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
                FailureKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
                FailureKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
                FailureKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
                FailureKind.INTERNAL: grpc.StatusCode.INTERNAL}


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    await context.abort(code, message, trailing_metadata=options.origin("coordinator"))


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        """In a secure cluster, a client presents a known bearer token or the cluster's client certificate."""
        coordinator = self.coordinator
        if coordinator.identity is None:
            return
        if coordinator.tokens is None:
            if caller(context) != CLIENT:
                await _abort(context, grpc.StatusCode.UNAUTHENTICATED, f"cluster {coordinator.spec.name} serves clients "
                             "that present its client certificate (client.pem from speed certs init)")
            return
        if not coordinator.bearer_known(dict(context.invocation_metadata() or ()).get("authorization", "")):
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, f"cluster {coordinator.spec.name} needs a valid bearer "
                         "token; ask its operator for one (speed tokens add NAME) and pass it with --token or SPEED_TOKEN")

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        await self._authenticate(context)
        try:
            prepared = self.coordinator.prepare(request_from_wire(request))
        except SpeedError as exc:  # an option out of range, found while reading the message
            self.coordinator.metrics.request_ended("invalid")
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RequestFailed as exc:
            await _abort(context, STATUS_CODES[exc.kind], exc.message)
        allowed = context.time_remaining()  # None: the client set no deadline
        deadline = None if allowed is None else asyncio.get_running_loop().time() + allowed - DEADLINE_MARGIN_S
        try:
            async with contextlib.aclosing(self.coordinator.serve(prepared, deadline=deadline)) as events:
                async for event in events:
                    yield event_to_wire(event)
        except asyncio.TimeoutError:
            await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, _late(prepared, allowed))
        except RequestFailed as exc:
            await _abort(context, STATUS_CODES[exc.kind], exc.message)

    async def ClusterStatus(self, request: pb.ClusterStatusRequest, context) -> pb.ClusterStatusReply:
        await self._authenticate(context)
        return self.coordinator.status()


def _late(request: Request, allowed: float) -> str:
    where = (f"after {request.sent_tokens} generated token(s)" if request.admitted
             else "while it waited for a free sequence slot")
    return (f"the request did not finish within its {round(allowed, 1):g} s deadline ({where}); give it a longer timeout, "
            "ask for fewer tokens, or retry when the cluster is less busy")


class RegistryService(pb_grpc.RegistryServicer):
    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        try:
            await self.coordinator.register(request)
        except Unverified as exc:
            log.warning("refused a registration from %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except SpeedError as exc:
            log.error("refused a node: %s", exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.RegisterReply(cluster=self.coordinator.spec.name,
                                heartbeat_interval_s=self.coordinator.spec.coordinator.heartbeat_interval_s,
                                incarnation=self.coordinator.engine.incarnation)

    async def _only_the_node(self, context, name: str, what: str) -> None:
        """In a secure cluster, only the node's own certificate may speak for it."""
        if self.coordinator.tokens is None and self.coordinator.identity is not None \
                and caller(context) != node_common_name(name):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"only node {name}'s certificate may {what} for it")

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        await self._only_the_node(context, request.name, "beat")
        node = next((n for n in self.coordinator.nodes if n.name == request.name), None)
        if node is None or node.state != NodeState.SERVING:
            return pb.HeartbeatReply(known=False)
        problem = heartbeat_problem(request, node.max_sequences, [n.name for n in self.coordinator.nodes])
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a heartbeat of node {node.name}: {problem}")
        node.last_heartbeat, node.held = time.monotonic(), request.open_sequences
        node.step_ms, node.positions_per_s = request.step_ms, request.positions_per_s
        node.memory_available_bytes, node.links = request.memory_available_bytes, list(request.links)
        return pb.HeartbeatReply(known=True)


    async def Settings(self, request: pb.SettingsRequest, context) -> pb.ClusterSettings:
        return self.coordinator.settings()  # the secret (and in a secure cluster a certificate) got the call here

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.DrainReply:
        await self._only_the_node(context, request.name, "leave")
        try:
            placement = await self.coordinator.leave(request.name)
        except SpeedError as exc:
            log.warning("%s", exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        nodes = {node.name: node for node in self.coordinator.nodes}
        return pb.DrainReply(placement=[nodes[name].place(stage) for stage, name in sorted(placement.items())])


def heartbeat_problem(beat: pb.HeartbeatRequest, max_sequences: int, nodes: list[str]) -> str:
    """What is out of range in a heartbeat, "" when nothing: only values a node can report are stored and shown.
    nodes: the cluster's, the only ones a node may report links to."""
    if not 0 <= beat.open_sequences <= max_sequences:
        return f"open_sequences must be 0 to {max_sequences} (its max_sequences), got {beat.open_sequences}"
    for field, limit in (("step_ms", MAX_STEP_MS), ("positions_per_s", MAX_POSITIONS_PER_S),
                         ("memory_available_bytes", MAX_MEMORY_BYTES)):
        value = getattr(beat, field)
        if not 0 <= value <= limit:  # also NaN
            return f"{field} must be 0 to {limit:g}, got {value}"
    named = [link.node for link in beat.links]
    if len(set(named)) != len(named) or not set(named) <= set(nodes) - {beat.name}:
        return f"links must name other nodes of the cluster ({', '.join(nodes)}), each once"
    for link in beat.links:
        if not 0 <= link.rtt_ms <= MAX_STEP_MS:
            return f"links' rtt_ms must be 0 to {MAX_STEP_MS:g}, got {link.rtt_ms}"
    return ""


def run_coordinator(cluster_path: Path, *, data_path: str | None = None) -> None:
    """data_path: overrides the cluster file's."""
    spec = load_cluster(cluster_path)
    if data_path is not None:
        spec = dataclasses.replace(spec, data_path=DataPathKind(data_path))
    bundle = load_bundle(spec.bundle, verify=False)
    bundle.verify([bundle.manifest["tokenizer"]])  # all a coordinator reads of it
    spec.check_stages(bundle.config.n_stages)
    coordinator = Coordinator(spec, bundle)
    http = _openai_api(coordinator) if spec.coordinator.http_address is not None else None
    if spec.coordinator.metrics_port is not None:
        coordinator.metrics.serve(parse_address(spec.coordinator.address)[0], spec.coordinator.metrics_port)
    asyncio.run(_serve(coordinator, http))


def _openai_api(coordinator: Coordinator):
    """The HTTP API's server and bound socket; it needs the serve extra, which a coordinator without one does not."""
    address = coordinator.spec.coordinator.http_address
    try:
        from runtime.coordinator.openai_api import http_server
    except ModuleNotFoundError as exc:
        raise SpeedError(f"coordinator.http_address needs {exc.name}, part of the serve extra; install it with: "
                         "pip install -e '.[serve]' -c constraints.txt, or remove http_address") from None
    if check_exposure(coordinator.spec, address, "the OpenAI-compatible API"):
        log.warning("serving the OpenAI-compatible API on %s WITHOUT TLS or authentication, as the cluster file "
                    "allows (insecure: true)", address)
    return http_server(coordinator)


async def _serve(coordinator: Coordinator, http) -> None:
    """http: the OpenAI-compatible API's server and socket, or None."""
    server = grpc.aio.server(options=options.SERVER,
                             interceptors=[AsyncSecretCheck(coordinator.secret, "the coordinator")])
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(coordinator), server)
    pb_grpc.add_RegistryServicer_to_server(RegistryService(coordinator), server)
    health_pb2_grpc.add_HealthServicer_to_server(coordinator.health, server)
    await coordinator.update_health()
    address = coordinator.spec.coordinator.address
    if check_exposure(coordinator.spec, address, "the coordinator"):
        log.warning("serving %s WITHOUT TLS or authentication, as the cluster file allows (insecure: true)", address)
    credentials = None
    if coordinator.identity is not None:
        credentials = coordinator.identity.server(require_client_certificate=coordinator.tokens is None)
    options.listen(server, address, credentials)
    await server.start()
    log.info("coordinator of cluster %s (incarnation %d) listening on %s; waiting for %d node(s) to register",
             coordinator.spec.name, coordinator.engine.incarnation, coordinator.spec.coordinator.address,
             len(coordinator.nodes))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.create_task(coordinator.engine.run()), asyncio.create_task(coordinator.watch_heartbeats()),
             asyncio.create_task(coordinator.watch_timings())]
    if http is not None:
        http_server, listener = http
        tasks.append(asyncio.create_task(http_server.serve(sockets=[listener])))
        log.info("OpenAI-compatible API on %s", coordinator.spec.coordinator.http_address)
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
    await coordinator.health.enter_graceful_shutdown()
    if http is not None:
        http_server.should_exit = True
    await server.stop(grace=STOP_GRACE_S)
    for task in tasks:
        task.cancel()
    for node in coordinator.nodes:
        await node.disconnect()
    for task in done - {stopped}:
        task.result()  # an engine crash is a bug: let it be seen
    log.info("coordinator stopped")
