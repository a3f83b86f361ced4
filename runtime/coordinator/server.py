"""`speed coordinator`: the client-facing Coordinator service and the Registry of a cluster's nodes.

Nodes register themselves (and again after a restart of either side); the coordinator checks that a
node is the one the cluster file names, hosts the stages it says and serves the same bundle, then
opens its step stream. Each run of the coordinator is an incarnation (its start time in nanoseconds):
nodes learn it at registration and free whatever an older one left. Health is SERVING while every
stage has a serving node to run it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from runtime.coordinator.engine import Engine
from runtime.coordinator.metrics import CoordinatorMetrics
from runtime.coordinator.remote_node import RemoteNode
from runtime.coordinator.requests import QueueFull, Request, RequestFailed
from runtime.coordinator.tokens import TOKENS_FILE, TokenFile
from runtime.core.bundle import Bundle, load_bundle
from runtime.core.cluster_file import ClusterSpec, load_cluster, parse_address, same_address
from runtime.core.errors import SpeedError
from runtime.core.generation import guess_thresholds
from runtime.core.limits import check_request
from runtime.core.node_state import NodeState
from runtime.core.placement import stages_of
from runtime.core.stopping import StopStrings
from runtime.core.text_stream import TextStream
from runtime.wire import options
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.generation import options_from_wire
from runtime.wire.security import CLIENT, Identity, caller, check_exposure, expect_name, node_common_name

log = logging.getLogger("speed.coordinator")

SERVICE_NAME = "speed.v1.Coordinator"
MISSED_HEARTBEATS = 3  # a node silent this many intervals is down
DIAL_BACK_TIMEOUT_S = 2.0  # to check a registering node at the address it gave
STOP_GRACE_S = 2.0
DEADLINE_MARGIN_S = 0.05  # answer a little before the client's own deadline, so it gets our sentence


class Cluster:
    """The coordinator's state: the cluster file, the bundle's identity, the nodes and the engine."""

    def __init__(self, spec: ClusterSpec, bundle: Bundle):
        self.spec = spec
        self.bundle = bundle
        self.tokenizer = bundle.tokenizer()
        self.health = health.aio.HealthServicer()
        self.metrics = CoordinatorMetrics()
        security = spec.security
        self.identity = Identity.load(security, "coordinator") if security else None
        self.tokens = TokenFile(security.certs / TOKENS_FILE) if security and security.client_auth == "token" else None
        self.nodes = [RemoteNode(node, step_timeout_s=spec.coordinator.step_timeout_s, on_state_change=self.node_changed)
                      for node in spec.nodes]
        self.engine = Engine(self.nodes, config=bundle.config, eos_id=bundle.eos_token_id,
                             prefill_chunk=spec.speculation.prefill_chunk, max_queue=spec.coordinator.max_queue,
                             incarnation=time.time_ns(), metrics=self.metrics, data_path=spec.data_path,
                             stall_timeout_s=spec.coordinator.step_timeout_s * (bundle.config.n_stages + 1))

    @property
    def serving(self) -> bool:
        return self.engine.can_serve

    async def node_changed(self) -> None:
        self.engine.wake()
        await self.update_health()

    async def update_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service_name in ("", SERVICE_NAME):
            await self.health.set(service_name, status)

    def prepare(self, request: pb.GenerateRequest) -> Request:
        """A client's request, checked; SpeedError with a sentence when it cannot be served.

        Sizes are checked before anything is tokenized or decoded, so a hostile request costs little: a
        prompt of more characters than 16 per position of the context (at least 64 KiB) cannot fit it,
        and stop strings are short (a stop string is checked against the decoded tail at every token)."""
        max_prompt_chars = max(64 * 1024, 16 * self.bundle.config.context_length)
        max_stop_strings, max_stop_chars, max_temperature = 16, 256, 100.0  # as `speed generate` allows
        prompt = request.prompt
        if not prompt:
            raise SpeedError("the prompt is empty; give some text for the model to continue")
        if len(prompt) > max_prompt_chars:
            raise SpeedError(f"the prompt has {len(prompt)} characters; at most {max_prompt_chars} are accepted, "
                             f"more than the model's context of {self.bundle.config.context_length} tokens holds")
        generation = options_from_wire(request)
        if generation.max_new_tokens < 1:
            raise SpeedError(f"max_new_tokens must be at least 1, got {generation.max_new_tokens}")
        if not generation.temperature <= max_temperature:  # also NaN and infinity
            raise SpeedError(f"temperature must be 0 (greedy) to {max_temperature:g}, got {generation.temperature}")
        generation.sampling  # noqa: B018 (raises with a sentence when a setting is out of range)
        if len(generation.stop) > max_stop_strings:
            raise SpeedError(f"give at most {max_stop_strings} stop strings, got {len(generation.stop)}")
        longest = max((len(s) for s in generation.stop), default=0)
        if longest > max_stop_chars:
            raise SpeedError(f"a stop string may have at most {max_stop_chars} characters, got one of {longest}")
        prompt_ids = self.tokenizer.encode(self.bundle.prompt_text(prompt, chat=generation.chat)).ids
        check_request(prompt_ids, self.bundle.config, generation.max_new_tokens)
        stop = StopStrings(self.tokenizer, list(generation.stop))
        speculative = self.spec.speculation.enabled if generation.speculative is None else generation.speculative
        generated = self._continuation(request.continuation, generation.max_new_tokens)
        text = TextStream(self.tokenizer, stop)
        text.emitted = min(max(request.continuation.text_chars, 0), len(text.text(generated)))
        thresholds = guess_thresholds((generation.guess_threshold, self.spec.speculation.guess_threshold),
                                      self.bundle.guess_thresholds, self.bundle.config.n_stages)
        window = self.spec.speculation.window if generation.window is None else generation.window
        return Request(prompt_ids=prompt_ids, options=generation, speculative=speculative, stop=stop, text=text,
                       generated=generated, guess_thresholds=thresholds, window=window)

    def _continuation(self, continuation: pb.Continuation, max_new_tokens: int) -> list[int]:
        vocab = self.bundle.config.vocab_size
        limit = min(max_new_tokens, self.bundle.config.context_length)  # counted before any id is read
        tokens = list(continuation.token_ids) if len(continuation.token_ids) <= limit else None
        if tokens is None or not all(0 <= token < vocab for token in tokens):
            raise SpeedError(f"the continuation must hold at most {limit} token ids (max_new_tokens, within the "
                             f"model's context), each in 0..{vocab - 1}: the tokens this request already received")
        return tokens

    def open_node_channel(self, name: str, address: str) -> grpc.aio.Channel:
        """A channel to a node that, in a secure cluster, only the node's own certificate can answer."""
        if self.identity is None:
            return grpc.aio.insecure_channel(address, options=options.CHANNEL)
        return grpc.aio.secure_channel(address, self.identity.channel(), options=options.CHANNEL + expect_name(name))

    async def register(self, request: pb.RegisterRequest) -> RemoteNode:
        """Accept a node by what it answers when dialled back at the address it gave, never by the request's
        own claims: in a secure cluster only the holder of the node's certificate can answer."""
        node = next((n for n in self.nodes if n.name == request.info.name), None)
        if node is None:
            raise SpeedError(f"cluster file {self.spec.source or self.spec.path} has no node named "
                             f"{request.info.name!r}; its nodes are {', '.join(n.name for n in self.nodes)}")
        if not same_address(request.address, node.spec.address):  # never dial an address a caller chose
            raise SpeedError(f"node {node.name} registered with address {request.address!r} but the cluster file gives "
                             f"it {node.spec.address}; start the node with the same cluster file")
        channel = self.open_node_channel(node.name, request.address)
        try:
            info = await pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=DIAL_BACK_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            raise Unverified(f"node {node.name} could not be reached as itself at {request.address} "
                             f"({exc.code().name}: {exc.details()})") from None
        try:
            self._check_node(node, info)
        except SpeedError:
            await channel.close()
            raise
        serving_us = node.state == NodeState.SERVING and info.incarnation == self.engine.incarnation
        if serving_us and node.address == request.address:
            await channel.close()  # it is serving us already: nothing to do (a repeated registration)
            return node
        await node.connect(info, request.address, channel)
        log.info("%s registered: stages %s, %s, %d thread(s)", node.describe(), list(info.stages), info.provider,
                 info.threads)
        return node

    def _check_node(self, node: RemoteNode, info: pb.NodeInfo) -> None:
        where = f"cluster file {self.spec.source or self.spec.path}"
        if info.name != node.name:
            raise SpeedError(f"the node at that address is {info.name!r}, not {node.name}")
        if tuple(info.stages) != node.spec.stages:
            raise SpeedError(f"node {info.name} hosts stages {list(info.stages)} but {where} gives it "
                             f"{list(node.spec.stages)}; start the node with the same cluster file")
        if info.bundle_sha256 != self.bundle.sha256:
            raise SpeedError(f"node {info.name} serves bundle {info.bundle_sha256[:12]} but the cluster's is "
                             f"{self.bundle.sha256[:12]}; give every device the same bundle")

    async def watch_heartbeats(self) -> None:
        interval = self.spec.coordinator.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for node in self.nodes:
                if node.state == NodeState.SERVING and now - node.last_heartbeat > MISSED_HEARTBEATS * interval + 1:
                    log.warning("%s missed %d heartbeats; marking it down", node.describe(), MISSED_HEARTBEATS)
                    await node.disconnect(NodeState.DOWN)

    def status(self) -> pb.ClusterStatusReply:
        now = time.monotonic()
        engine = self.engine
        reply = pb.ClusterStatusReply(cluster=self.spec.name, bundle_sha256=self.bundle.sha256, serving=self.serving,
                                      active_requests=engine.active_requests, queued_requests=engine.queued_requests,
                                      max_queue=engine.max_queue, speculation=self.spec.speculation.enabled,
                                      incarnation=engine.incarnation)
        for node in self.nodes:
            reply.nodes.add(name=node.name, address=node.address, stages=node.spec.stages, state=node.state,
                            provider=node.info.provider if node.info else "", threads=node.spec.threads,
                            last_heartbeat_s=now - node.last_heartbeat if node.last_heartbeat else -1.0,
                            hosting=stages_of(engine.placement, node.name), sequences=node.held,
                            max_sequences=node.max_sequences)
        return reply


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    await context.abort(code, message, trailing_metadata=options.origin("coordinator"))


class Unverified(SpeedError):
    """A registration that could not be checked now (the node did not answer as itself): it may retry."""


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        """In a secure cluster, a client presents a known bearer token or the cluster's client certificate."""
        cluster = self.cluster
        if cluster.identity is None:
            return
        if cluster.tokens is None:
            if caller(context) != CLIENT:
                await _abort(context, grpc.StatusCode.UNAUTHENTICATED, f"cluster {cluster.spec.name} serves clients "
                             "that present its client certificate (client.pem from speed certs init)")
            return
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() != "bearer" or cluster.tokens.owner(token.strip()) is None:
            cluster.metrics.request_ended("unauthenticated")
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, f"cluster {cluster.spec.name} needs a valid bearer "
                         "token; ask its operator for one (speed tokens add NAME) and pass it with --token or SPEED_TOKEN")

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        await self._authenticate(context)
        metrics = self.cluster.metrics
        try:
            prepared = self.cluster.prepare(request)
        except SpeedError as exc:
            metrics.request_ended("invalid")
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        engine = self.cluster.engine
        try:
            engine.submit(prepared)
        except QueueFull as exc:
            metrics.request_ended("rejected")
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        loop = asyncio.get_running_loop()
        allowed = context.time_remaining()  # None: the client set no deadline
        deadline = None if allowed is None else loop.time() + allowed - DEADLINE_MARGIN_S
        outcome = "cancelled"  # unless it ends otherwise: the client went away
        try:
            while outcome == "cancelled":
                try:
                    event = await asyncio.wait_for(prepared.events.get(),
                                                   None if deadline is None else max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:
                    outcome = "deadline_exceeded"
                    engine.cancel(prepared)
                    await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, _late(prepared, allowed))
                if isinstance(event, RequestFailed):
                    outcome = "failed"
                    await _abort(context, event.code, event.message)
                if event.HasField("finished"):
                    outcome = "completed"
                yield event
        finally:
            metrics.request_ended(outcome)
            if outcome == "cancelled":
                engine.cancel(prepared)  # the client went away: free the sequence's caches now

    async def ClusterStatus(self, request: pb.ClusterStatusRequest, context) -> pb.ClusterStatusReply:
        await self._authenticate(context)
        return self.cluster.status()


def _late(request: Request, allowed: float) -> str:
    where = (f"after {request.sent_tokens} generated token(s)" if request.admitted
             else "while it waited for a free sequence slot")
    return (f"the request did not finish within its {round(allowed, 1):g} s deadline ({where}); give it a longer timeout, "
            "ask for fewer tokens, or retry when the cluster is less busy")


class RegistryService(pb_grpc.RegistryServicer):
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        try:
            await self.cluster.register(request)
        except Unverified as exc:
            log.warning("refused a registration from %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except SpeedError as exc:
            log.error("refused a node: %s", exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.RegisterReply(cluster=self.cluster.spec.name,
                                heartbeat_interval_s=self.cluster.spec.coordinator.heartbeat_interval_s,
                                incarnation=self.cluster.engine.incarnation)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        if self.cluster.tokens is None and self.cluster.identity is not None \
                and caller(context) != node_common_name(request.name):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"only node {request.name}'s certificate may beat for it")
        node = next((n for n in self.cluster.nodes if n.name == request.name), None)
        if node is None or node.state != NodeState.SERVING:
            return pb.HeartbeatReply(known=False)
        node.last_heartbeat, node.held = time.monotonic(), request.open_sequences
        return pb.HeartbeatReply(known=True)


def run_coordinator(cluster_path: Path, *, data_path: str | None = None) -> None:
    """data_path: overrides the cluster file's."""
    spec = load_cluster(cluster_path)
    if data_path is not None:
        spec = dataclasses.replace(spec, data_path=data_path)
    bundle = load_bundle(spec.bundle, verify=False)
    bundle.verify([bundle.manifest["tokenizer"]])  # all a coordinator reads of it
    spec.check_stages(bundle.config.n_stages)
    cluster = Cluster(spec, bundle)
    if spec.coordinator.metrics_port is not None:
        cluster.metrics.serve(parse_address(spec.coordinator.address)[0], spec.coordinator.metrics_port)
    asyncio.run(_serve(cluster))


async def _serve(cluster: Cluster) -> None:
    server = grpc.aio.server(options=options.SERVER)
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(cluster), server)
    pb_grpc.add_RegistryServicer_to_server(RegistryService(cluster), server)
    health_pb2_grpc.add_HealthServicer_to_server(cluster.health, server)
    await cluster.update_health()
    address = cluster.spec.coordinator.address
    if check_exposure(cluster.spec, address, "the coordinator"):
        log.warning("serving %s WITHOUT TLS or authentication, as the cluster file allows (insecure: true)", address)
    credentials = None
    if cluster.identity is not None:
        credentials = cluster.identity.server(require_client_certificate=cluster.tokens is None)
    options.listen(server, address, credentials)
    await server.start()
    log.info("coordinator of cluster %s (incarnation %d) listening on %s; waiting for %d node(s) to register",
             cluster.spec.name, cluster.engine.incarnation, cluster.spec.coordinator.address, len(cluster.nodes))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.create_task(cluster.engine.run()), asyncio.create_task(cluster.watch_heartbeats())]
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
    await cluster.health.enter_graceful_shutdown()
    await server.stop(grace=STOP_GRACE_S)
    for task in tasks:
        task.cancel()
    for node in cluster.nodes:
        await node.disconnect()
    for task in done - {stopped}:
        task.result()  # an engine crash is a bug: let it be seen
    log.info("coordinator stopped")
