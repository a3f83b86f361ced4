"""`speed coordinator`: the client-facing Coordinator service and the Registry of a cluster's nodes.

Nodes register themselves (and again after a restart of either side); the coordinator checks that a
node is the one the cluster file names, hosts the stages it says and serves the same bundle, then
opens its step stream. Health is SERVING while every stage has a serving node.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy.cluster_file import ClusterSpec, load_cluster
from runtime.bundle import Bundle, load_bundle
from runtime.engine import Engine, Request, RequestFailed
from runtime.errors import SpeedError
from runtime.reference import check_request
from runtime.remote_node import DOWN, SERVING, RemoteNode
from runtime.stopping import StopStrings
from runtime.text_stream import TextStream
from runtime.wire import options
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.sampling import sampling_from_wire

log = logging.getLogger("speed.coordinator")

SERVICE_NAME = "speed.v1.Coordinator"
DEFAULT_MAX_NEW_TOKENS = 64
MISSED_HEARTBEATS = 3  # a node silent this many intervals is down
STOP_GRACE_S = 2.0


class Cluster:
    """The coordinator's state: the cluster file, the bundle's identity, the nodes and the engine."""

    def __init__(self, spec: ClusterSpec, bundle: Bundle):
        self.spec = spec
        self.bundle = bundle
        self.tokenizer = bundle.tokenizer()
        self.health = health.aio.HealthServicer()
        self.nodes = [RemoteNode(node, step_timeout_s=spec.coordinator.step_timeout_s, on_state_change=self.update_health)
                      for node in spec.nodes]
        self.engine = Engine(self.nodes, config=bundle.config, eos_id=bundle.eos_token_id,
                             prefill_chunk=spec.speculation.prefill_chunk,
                             max_sequences=min(node.max_sequences for node in spec.nodes))

    @property
    def serving(self) -> bool:
        return all(node.state == SERVING for node in self.nodes)

    async def update_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service_name in ("", SERVICE_NAME):
            await self.health.set(service_name, status)

    def prepare(self, request: pb.GenerateRequest) -> Request:
        """A client's request, checked; SpeedError with a sentence when it cannot be served."""
        if not request.prompt:
            raise SpeedError("the prompt is empty; give some text for the model to continue")
        max_new_tokens = request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if max_new_tokens < 1:
            raise SpeedError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        sampling = sampling_from_wire(request.sampling)
        prompt_ids = self.tokenizer.encode(self.bundle.prompt_text(request.prompt, chat=request.chat)).ids
        check_request(prompt_ids, self.bundle.config, max_new_tokens)
        stop = StopStrings(self.tokenizer, list(request.stop))
        speculative = request.speculative if request.HasField("speculative") else self.spec.speculation.enabled
        return Request(prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, speculative=speculative,
                       stop=stop, text=TextStream(self.tokenizer, stop), ignore_eos=request.ignore_eos,
                       plain_guesses=request.plain_guesses)

    async def register(self, request: pb.RegisterRequest) -> RemoteNode:
        info = request.info
        node = next((n for n in self.nodes if n.name == info.name), None)
        where = f"cluster file {self.spec.source or self.spec.path}"
        if node is None:
            raise SpeedError(f"{where} has no node named {info.name!r}; its nodes are "
                             f"{', '.join(n.name for n in self.nodes)}")
        if tuple(info.stages) != node.spec.stages:
            raise SpeedError(f"node {info.name} hosts stages {list(info.stages)} but {where} gives it "
                             f"{list(node.spec.stages)}; start the node with the same cluster file")
        if info.bundle_sha256 != self.bundle.sha256:
            raise SpeedError(f"node {info.name} serves bundle {info.bundle_sha256[:12]} but the cluster's is "
                             f"{self.bundle.sha256[:12]}; give every device the same bundle")
        await node.connect(info, request.address)
        log.info("%s registered: stages %s, %s, %d thread(s)", node.describe(), list(info.stages), info.provider,
                 info.threads)
        return node

    async def watch_heartbeats(self) -> None:
        interval = self.spec.coordinator.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for node in self.nodes:
                if node.state == SERVING and now - node.last_heartbeat > MISSED_HEARTBEATS * interval + 1:
                    log.warning("%s missed %d heartbeats; marking it down", node.describe(), MISSED_HEARTBEATS)
                    await node.disconnect(DOWN)

    def status(self) -> pb.ClusterStatusReply:
        now = time.monotonic()
        reply = pb.ClusterStatusReply(cluster=self.spec.name, bundle_sha256=self.bundle.sha256, serving=self.serving,
                                      active_requests=self.engine.active_requests,
                                      speculation=self.spec.speculation.enabled)
        for node in self.nodes:
            reply.nodes.add(name=node.name, address=node.address, stages=node.spec.stages, state=node.state,
                            provider=node.info.provider if node.info else "", threads=node.spec.threads,
                            last_heartbeat_s=now - node.last_heartbeat if node.last_heartbeat else -1.0)
        return reply


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            prepared = self.cluster.prepare(request)
        except SpeedError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        engine = self.cluster.engine
        engine.submit(prepared)
        finished = False
        try:
            while not finished:
                event = await prepared.events.get()
                if isinstance(event, RequestFailed):
                    finished = True
                    await context.abort(event.code, event.message)
                finished = event.HasField("finished")
                yield event
        finally:
            if not finished:
                engine.cancel(prepared)  # the client went away: free the sequence's caches now

    async def ClusterStatus(self, request: pb.ClusterStatusRequest, context) -> pb.ClusterStatusReply:
        return self.cluster.status()


class RegistryService(pb_grpc.RegistryServicer):
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        try:
            await self.cluster.register(request)
        except SpeedError as exc:
            log.error("refused a node: %s", exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.RegisterReply(cluster=self.cluster.spec.name,
                                heartbeat_interval_s=self.cluster.spec.coordinator.heartbeat_interval_s)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        node = next((n for n in self.cluster.nodes if n.name == request.name), None)
        if node is None or node.state != SERVING:
            return pb.HeartbeatReply(known=False)
        node.last_heartbeat = time.monotonic()
        return pb.HeartbeatReply(known=True)


def run_coordinator(cluster_path: Path) -> None:
    spec = load_cluster(cluster_path)
    bundle = load_bundle(spec.bundle)
    spec.check_stages(bundle.config.n_stages)
    asyncio.run(_serve(Cluster(spec, bundle)))


async def _serve(cluster: Cluster) -> None:
    server = grpc.aio.server(options=options.SERVER)
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(cluster), server)
    pb_grpc.add_RegistryServicer_to_server(RegistryService(cluster), server)
    health_pb2_grpc.add_HealthServicer_to_server(cluster.health, server)
    await cluster.update_health()
    options.listen(server, cluster.spec.coordinator.address)
    await server.start()
    log.info("coordinator of cluster %s listening on %s; waiting for %d node(s) to register", cluster.spec.name,
             cluster.spec.coordinator.address, len(cluster.nodes))

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
