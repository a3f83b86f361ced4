"""The coordinator: the cluster file, the bundle's identity, the nodes and the engine, and what both front
doors (the gRPC service and the OpenAI-compatible HTTP API) ask of them: a request checked, served, and
the cluster's status. Requests come and go in the core's types (runtime/core/request.py); each door
translates them to its own protocol.

Nodes register themselves (and again after a restart of either side); the coordinator checks that a
node is the one the cluster file names (or one joining without a line in it, proven the same way),
hosts the stages it says and serves the same bundle, then opens its step stream. Each run of the
coordinator is an incarnation (its start time in nanoseconds): nodes learn it at registration and free
whatever an older one left. Health is SERVING while every stage has a serving node to run it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2

from runtime.coordinator.auto_placement import MEASURE_TIMEOUT_STEPS, AutoPlacement
from runtime.coordinator.data_path import data_path_for
from runtime.coordinator.engine import Engine
from runtime.coordinator.metrics import CoordinatorMetrics
from runtime.coordinator.remote_node import MAX_MEMORY_BYTES, RemoteNode, measurement_problem, time_passes_again
from runtime.coordinator.requests import Request
from runtime.coordinator.ring_link import RingDialler
from runtime.coordinator.tokens import TOKENS_FILE, TokenFile
from runtime.core.bundle import Bundle
from runtime.core.cluster_file import NODE_NAME, ClusterSpec, NodeSpec, PlacementKind, listen_addresses, same_address
from runtime.core.errors import SpeedError
from runtime.core.generation import guess_thresholds
from runtime.core.limits import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE, check_request, max_prompt_chars
from runtime.core.node_state import NodeState
from runtime.core.placement import stages_of
from runtime.core.request import FailureKind, GenerationRequest, RequestEvent, RequestFailed, TextChunk
from runtime.core.stopping import StopStrings
from runtime.core.text_stream import TextStream
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import load_secret, secret_metadata
from runtime.wire.enums import to_wire
from runtime.wire.security import Identity, check_exposure, link_contexts, open_channel

log = logging.getLogger("speed.coordinator")

SERVICE_NAME = "speed.v1.Coordinator"
MISSED_HEARTBEATS = 3  # a node silent this many intervals is down
DIAL_BACK_TIMEOUT_S = 2.0  # to check a registering node at the address it gave
MAX_JOINED = 64  # nodes a cluster takes beside its file's: each holds streams and state here
DRAIN_POLL_S = 0.05  # how often a drain looks whether the node's stages have moved
TIMINGS_POLL_S = 0.2  # how often, under placement: file, the coordinator looks whether the serving nodes changed


class Coordinator:
    """The cluster file, the bundle's identity, the nodes and the engine."""

    def __init__(self, spec: ClusterSpec, bundle: Bundle):
        self.spec = spec
        self.bundle = bundle
        self.tokenizer = bundle.tokenizer()
        self.health = health.aio.HealthServicer()
        self.metrics = CoordinatorMetrics()
        security = spec.security
        self.identity = Identity.load(security, "coordinator") if security else None
        self.tokens = TokenFile(security.certs / TOKENS_FILE) if security and security.client_auth == "token" else None
        self.secret = load_secret(spec)
        self.nodes = [RemoteNode(node, step_timeout_s=spec.coordinator.step_timeout_s, on_state_change=self.node_changed,
                                 metadata=secret_metadata(self.secret)) for node in spec.nodes]
        self.file_nodes = {node.name for node in spec.nodes}  # the others joined
        ring_tls = link_contexts(security, "coordinator")[1] if security else None
        data_path = data_path_for(spec.data_path, prefill_chunk=spec.speculation.prefill_chunk,
                                  stall_timeout_s=spec.coordinator.step_timeout_s * (bundle.config.n_stages + 1),
                                  dial=RingDialler(self.secret, ring_tls))
        auto = AutoPlacement(spec, bundle, lambda: (self.engine.flips_seen, self.engine.checks_seen), self._measured) \
            if spec.placement == PlacementKind.AUTO else None
        self._timed_for: frozenset[str] = frozenset()  # the serving nodes last timed alone (placement: file)
        self.engine = Engine(self.nodes, config=bundle.config, eos_id=bundle.eos_token_id,
                             max_queue=spec.coordinator.max_queue, incarnation=time.time_ns(), metrics=self.metrics,
                             data_path=data_path,
                             choose_homes=auto.homes if auto else None)

    def _measured(self) -> tuple[dict[int, str], float, float]:
        engine = self.engine
        return dict(engine.placement), engine.measured_tokens_per_s(False), engine.measured_tokens_per_s(True)

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

    def bearer_known(self, authorization: str) -> bool:
        """Whether an Authorization value ("Bearer TOKEN") holds a token of the cluster's tokens file; a
        refusal counts in the metrics."""
        scheme, _, token = str(authorization).partition(" ")
        known = scheme.lower() == "bearer" and self.tokens is not None and self.tokens.owner(token.strip()) is not None
        if not known:
            self.metrics.request_ended("unauthenticated")
        return known

    def prepare(self, request: GenerationRequest) -> Request:
        """A client's request, checked; RequestFailed (INVALID, counted) with a sentence when it cannot be served."""
        try:
            return self._checked(request)
        except SpeedError as exc:
            self.metrics.request_ended("invalid")
            raise RequestFailed(FailureKind.INVALID, str(exc)) from None

    def _checked(self, request: GenerationRequest) -> Request:
        """The request as the engine takes it.

        Sizes are checked before anything is tokenized or decoded (runtime/core/limits.py), so a hostile
        request costs little."""
        longest_prompt = max_prompt_chars(self.bundle.config)
        prompt, messages = request.prompt, request.messages
        if messages and prompt:
            raise SpeedError("send either a prompt or a conversation of messages, not both")
        if not prompt and not messages:
            raise SpeedError("the prompt is empty; give some text for the model to continue")
        length = len(prompt) + sum(len(m.content) for m in messages)
        if length > longest_prompt:
            raise SpeedError(f"the prompt has {length} characters; at most {longest_prompt} are accepted, "
                             f"more than the model's context of {self.bundle.config.context_length} tokens holds")
        generation = request.options
        if generation.max_new_tokens < 1:
            raise SpeedError(f"max_new_tokens must be at least 1, got {generation.max_new_tokens}")
        if not generation.temperature <= MAX_TEMPERATURE:  # also NaN and infinity
            raise SpeedError(f"temperature must be 0 (greedy) to {MAX_TEMPERATURE:g}, got {generation.temperature}")
        generation.sampling  # noqa: B018 (raises with a sentence when a setting is out of range)
        if len(generation.stop) > MAX_STOP_STRINGS:
            raise SpeedError(f"give at most {MAX_STOP_STRINGS} stop strings, got {len(generation.stop)}")
        longest = max((len(s) for s in generation.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise SpeedError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}")
        bundle = self.bundle
        shown = bundle.conversation_text(messages) if messages else bundle.prompt_text(prompt, chat=generation.chat)
        prompt_ids = self.tokenizer.encode(shown).ids
        check_request(prompt_ids, self.bundle.config, generation.max_new_tokens)
        stop = StopStrings(self.tokenizer, list(generation.stop))
        speculative = self.spec.speculation.enabled if generation.speculative is None else generation.speculative
        generated = self._continuation(request.received_tokens, generation.max_new_tokens)
        text = TextStream(self.tokenizer, stop)
        text.emitted = min(max(request.received_chars, 0), len(text.text(generated)))
        thresholds = guess_thresholds((generation.guess_threshold, self.spec.speculation.guess_threshold),
                                      self.bundle.guess_thresholds, self.bundle.config.n_stages)
        window = self.spec.speculation.window if generation.window is None else generation.window
        return Request(prompt_ids=prompt_ids, options=generation, speculative=speculative, stop=stop, text=text,
                       received=generated, guess_thresholds=thresholds, window=window)

    async def serve(self, request: Request, *, deadline: float | None = None) -> AsyncIterator[RequestEvent]:
        """Submit a prepared request and yield its text chunks, then its result. Raises RequestFailed when it
        cannot wait (OVERLOADED) or be finished, asyncio.TimeoutError past the deadline (the event loop's
        clock); a caller that stops listening cancels it, which frees its caches on every node."""
        engine, loop = self.engine, asyncio.get_running_loop()
        try:
            engine.submit(request)
        except RequestFailed:
            self.metrics.request_ended("rejected")
            raise
        outcome = "cancelled"  # unless it ends otherwise: the caller went away
        try:
            while True:
                try:
                    event = await asyncio.wait_for(request.events.get(),
                                                   None if deadline is None else max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:
                    outcome = "deadline_exceeded"
                    raise
                if isinstance(event, RequestFailed):
                    outcome = "failed"
                    raise event
                if not isinstance(event, TextChunk):
                    outcome = "completed"
                yield event
                if outcome == "completed":
                    return
        finally:
            self.metrics.request_ended(outcome)
            if outcome in ("cancelled", "deadline_exceeded"):
                engine.cancel(request)

    def _continuation(self, received: tuple[int, ...], max_new_tokens: int) -> list[int]:
        vocab = self.bundle.config.vocab_size
        limit = min(max_new_tokens, self.bundle.config.context_length)  # counted before any id is read
        tokens = list(received) if len(received) <= limit else None
        if tokens is None or not all(0 <= token < vocab for token in tokens):
            raise SpeedError(f"the continuation must hold at most {limit} token ids (max_new_tokens, within the "
                             f"model's context), each in 0..{vocab - 1}: the tokens this request already received")
        return tokens

    def open_node_channel(self, name: str, address: str) -> grpc.aio.Channel:
        """A channel to a node that, in a secure cluster, only the node's own certificate can answer."""
        return open_channel(address, self.identity.channel() if self.identity else None, server_name=name, aio=True)

    async def register(self, request: pb.RegisterRequest) -> RemoteNode:
        """Accept a node by what it answers when dialled back at the address it gave, never by the request's
        own claims: in a secure cluster only the holder of the node's certificate can answer."""
        node = next((n for n in self.nodes if n.name == request.info.name), None)
        if node is None:
            node = self._joining(request)
        if not same_address(request.address, node.spec.address):  # never dial an address a caller chose
            raise SpeedError(f"node {node.name} registered with address {request.address!r} but the cluster file gives "
                             f"it {node.spec.address}; start the node with the same cluster file")
        channel = self.open_node_channel(node.name, request.address)
        try:
            info = await pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=DIAL_BACK_TIMEOUT_S,
                                                        metadata=secret_metadata(self.secret))
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
        if node not in self.nodes:
            self.nodes.append(node)
            self.engine.add(node)
        await node.connect(info, request.address, channel, request.assign_key)
        log.info("%s %s: stages %s, %s, %d thread(s)", node.describe(),
                 "registered" if node.name in self.file_nodes else "joined (not in the cluster file)",
                 list(info.stages), info.provider, info.threads)
        return node

    def _joining(self, request: pb.RegisterRequest) -> RemoteNode:
        """A node the cluster file does not name (`speed node --join`): it proves itself as every node does
        (the cluster's secret; in a secure cluster a certificate of the cluster's authority for its name,
        answered at the address it gave), runs no stage of its own and may be given any it holds."""
        info, where = request.info, f"cluster file {self.spec.source or self.spec.path}"
        if not NODE_NAME.fullmatch(info.name):
            raise SpeedError(f"a joining node's name may use only letters, digits, '-', '_' and '.', got {info.name!r}")
        if len(self.nodes) - len(self.file_nodes) >= MAX_JOINED:
            raise SpeedError(f"{MAX_JOINED} nodes have joined already, the most a cluster takes beside its file's")
        if info.stages:
            raise SpeedError(f"node {info.name} is not in {where}, so it runs no stage of its own; start it with "
                             "`speed node --join`")
        try:
            check_exposure(self.spec, request.address, f"node {info.name}")
        except SpeedError:
            raise SpeedError(f"node {info.name} would serve {request.address} without TLS off loopback, which "
                             f"{where} does not allow") from None
        taken = [owner for owner, address in listen_addresses(self.spec) if same_address(address, request.address)]
        taken += [n.name for n in self.nodes if same_address(n.address, request.address)]
        if taken:
            raise SpeedError(f"node {info.name} gave the address {request.address}, which {taken[0]} uses")
        spec = NodeSpec(name=info.name, address=request.address, stages=(), standby_stages=tuple(info.standby_stages),
                        device=info.device or "cpu", threads=info.threads, max_sequences=max(info.max_sequences, 1))
        return RemoteNode(spec, step_timeout_s=self.spec.coordinator.step_timeout_s, on_state_change=self.node_changed,
                          metadata=secret_metadata(self.secret))

    def settings(self) -> pb.ClusterSettings:
        """What a joining node needs to know of the cluster."""
        return pb.ClusterSettings(cluster=self.spec.name, bundle_sha256=self.bundle.sha256,
                                  prefill_chunk=self.spec.speculation.prefill_chunk,
                                  step_timeout_s=self.spec.coordinator.step_timeout_s,
                                  secure=self.spec.security is not None, insecure=self.spec.insecure)

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
        problem = measurement_problem(info)
        if problem:
            raise SpeedError(f"node {info.name} reports {problem}; is it this runtime's node?")
        if info.memory_available_bytes > MAX_MEMORY_BYTES:
            raise SpeedError(f"node {info.name} reports memory_available_bytes {info.memory_available_bytes}, more "
                             f"than {MAX_MEMORY_BYTES}; is it this runtime's node?")

    async def watch_timings(self) -> None:
        """Under placement: file, have the serving nodes time their passes again (time_passes_again) whenever they
        change (what `speed plan` predicts with): timed at their own start, nodes starting together on one
        machine slow each other's figures. (Under auto the choice does it.)"""
        while True:  # a task of the server's for as long as it serves
            await asyncio.sleep(TIMINGS_POLL_S)
            serving = self._serving_nodes()
            names = frozenset(node.name for node in serving)
            if self.spec.placement == PlacementKind.FILE and names != self._timed_for:
                with self.engine.timing_nodes():
                    await time_passes_again(serving, self.spec.coordinator.step_timeout_s * MEASURE_TIMEOUT_STEPS)
                self._timed_for = names

    def _serving_nodes(self) -> list[RemoteNode]:
        return [node for node in self.nodes if node.state == NodeState.SERVING]

    @property
    def timings_settled(self) -> bool:
        """Whether the serving nodes' figures are from timing them alone, after they all started."""
        if self.spec.placement != PlacementKind.FILE:
            return True  # a choice times them first
        return self._timed_for == frozenset(node.name for node in self._serving_nodes())

    async def watch_heartbeats(self) -> None:
        interval = self.spec.coordinator.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for node in self.nodes:
                if node.state == NodeState.SERVING and now - node.last_heartbeat > MISSED_HEARTBEATS * interval + 1:
                    log.warning("%s missed %d heartbeats; marking it down", node.describe(), MISSED_HEARTBEATS)
                    await node.disconnect(NodeState.DOWN)

    async def leave(self, name: str) -> dict[int, str]:
        """Move a draining node's stages to the other serving nodes (replaying what they carried), then let it
        go; the placement without it. SpeedError when no other node can run one of its stages."""
        node = next((n for n in self.nodes if n.name == name), None)
        if node is None or node.state != NodeState.SERVING:
            return dict(self.engine.placement)  # gone already
        engine = self.engine
        stage = engine.unplaceable_without(name)
        if stage is not None:
            raise SpeedError(f"node {name} cannot leave now: no other serving node can run stage {stage}; start one "
                             "that lists it (under stages or standby_stages) and drain again")
        engine.leaving.add(name)
        try:
            engine.wake()
            deadline = time.monotonic() + self.spec.coordinator.step_timeout_s * (self.bundle.config.n_stages + 2)
            while name in engine.placement.values() or not engine.placement_settled:
                if time.monotonic() > deadline or node.state != NodeState.SERVING:
                    raise SpeedError(f"node {name}'s stages could not be moved in time; the cluster's nodes are "
                                     "busy or failing, see the coordinator's log")
                await asyncio.sleep(DRAIN_POLL_S)
            await node.disconnect(NodeState.LEFT)
        finally:
            engine.leaving.discard(name)
        log.info("%s drained and left: the stages run on %s", node.describe(), ", ".join(
            f"{stage} {owner}" for stage, owner in sorted(engine.placement.items())))
        return dict(engine.placement)

    def status(self) -> pb.ClusterStatusReply:
        now = time.monotonic()
        engine = self.engine
        reply = pb.ClusterStatusReply(cluster=self.spec.name, bundle_sha256=self.bundle.sha256, serving=self.serving,
                                      active_requests=engine.active_requests, queued_requests=engine.queued_requests,
                                      max_queue=engine.max_queue, speculation=self.spec.speculation.enabled,
                                      placement_settled=engine.placement_settled and self.timings_settled,
                                      placement=str(self.spec.placement),
                                      flips=[pb.FlipCount(boundary=b, flips=f, checks=c) for b, (f, c)
                                             in enumerate(zip(engine.flips_seen, engine.checks_seen))],
                                      alone_sequential_tokens_per_s=engine.measured_tokens_per_s(False),
                                      alone_speculative_tokens_per_s=engine.measured_tokens_per_s(True))
        for node in self.nodes:
            reply.nodes.add(name=node.name, address=node.address, stages=node.spec.stages,
                            state=to_wire(node.state, pb.NodeState),
                            provider=node.info.provider if node.info else "", threads=node.spec.threads,
                            last_heartbeat_s=now - node.last_heartbeat if node.last_heartbeat else -1.0,
                            hosting=stages_of(engine.placement, node.name), sequences=node.held,
                            max_sequences=node.max_sequences, step_ms=node.step_ms,
                            positions_per_s=node.positions_per_s, pass_times=node.info.pass_times if node.info else [],
                            head_ms=node.info.head_ms if node.info else 0.0,
                            memory_available_bytes=node.memory_available_bytes, links=node.links,
                            machine=node.info.machine if node.info else None,
                            cores_used=node.info.cores_used if node.info else 0.0)
        return reply


class Unverified(SpeedError):
    """A registration that could not be checked now (the node did not answer as itself): it may retry."""
