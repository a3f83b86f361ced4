"""The coordinator's handle on a node, over a real gRPC channel, when a node's call to time its passes is still
running: the node answering, the node going, the coordinator stopping; and which nodes time at once."""

from __future__ import annotations

import asyncio
import logging

import grpc

from runtime.coordinator.remote_node import RemoteNode, time_passes_again
from runtime.core.cluster_file import load_cluster
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from tests.conftest import write_cluster

TIMED = [pb.PassTime(stage=0, rows=1, ms=1.5)]
REGISTERED = [pb.PassTime(stage=0, rows=1, ms=9.0)]


class TimingNode(pb_grpc.NodeServicer):
    """A node whose Measure answers only when `answer` is set, as a node still timing its passes."""

    def __init__(self) -> None:
        self.called = asyncio.Event()
        self.answer = asyncio.Event()

    async def Measure(self, request: pb.MeasureRequest, context) -> pb.NodeInfo:
        self.called.set()
        await self.answer.wait()
        return pb.NodeInfo(pass_times=TIMED, head_ms=0.5)


async def serving(spec, servers: list[grpc.aio.Server], machine: str = "") -> tuple[TimingNode, RemoteNode]:
    """A TimingNode serving on loopback (its server added to `servers`, for the caller to stop) and the
    coordinator's RemoteNode connected to it, registered as running on `machine`."""
    servicer, server = TimingNode(), grpc.aio.server()
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    servers.append(server)
    await server.start()
    node = RemoteNode(spec, step_timeout_s=3.0)
    await node.connect(pb.NodeInfo(name=spec.name, pass_times=REGISTERED, machine=pb.Machine(id=machine)), address,
                       grpc.aio.insecure_channel(address), "key")
    return servicer, node


def timing(tmp_path, scenario) -> tuple[asyncio.Task, RemoteNode]:
    """Run `scenario(node, servicer, task)` while `task` has the node time its passes; the task and the node."""
    spec = load_cluster(write_cluster(tmp_path)).nodes[0]

    async def run():
        servers = []
        try:
            servicer, node = await serving(spec, servers)
            task = asyncio.create_task(node.measure(timeout_s=60))
            await asyncio.wait_for(servicer.called.wait(), 10)
            await scenario(node, servicer, task)
            await asyncio.wait([task], timeout=10)
            assert task.done(), "the call to time its passes never ended"
            await node.disconnect()
            return task, node
        finally:
            for server in servers:
                await server.stop(grace=None)

    return asyncio.run(run())


def test_a_node_that_answers_gives_its_new_figures(tmp_path):
    async def answered(node, servicer, task):
        servicer.answer.set()

    task, node = timing(tmp_path, answered)
    assert task.result() is None
    assert list(node.info.pass_times) == TIMED and node.info.head_ms == 0.5


def test_a_node_that_goes_while_it_times_its_passes_keeps_its_figures(tmp_path, caplog):
    async def node_goes(node, servicer, task):
        await node.disconnect()  # as when it misses its heartbeats: its channel closes under the call

    with caplog.at_level(logging.INFO, logger="speed.coordinator"):
        task, node = timing(tmp_path, node_goes)
    assert not task.cancelled() and task.result() is None
    assert "went while it timed its passes" in caplog.text
    assert list(node.info.pass_times) == REGISTERED


def test_a_coordinator_stopping_while_a_node_times_its_passes_is_not_held_up(tmp_path):
    async def coordinator_stops(node, servicer, task):
        task.cancel()  # what a stopping coordinator does, in this order: its tasks cancelled, then each node's
        await node.disconnect()  # channel closed, here under the cancelled call

    task, node = timing(tmp_path, coordinator_stops)
    assert task.cancelled()  # a cancellation taken for the node going left the task running on: a hang at exit


def test_a_node_is_placed_with_its_link_address_on_the_host_it_registered_from(tmp_path):
    spec = load_cluster(write_cluster(tmp_path)).nodes[0]
    node = RemoteNode(spec, step_timeout_s=1.0, on_state_change=lambda node: None, metadata=())
    for registered, expected in (("127.0.0.1:50051", "127.0.0.1:6001"), ("[::1]:50051", "[::1]:6001")):
        node.info, node.address = pb.NodeInfo(name=spec.name, link_port=6001), registered
        assert node.place(2) == pb.StagePlace(stage=2, node=spec.name, address=registered, link_address=expected)


def test_nodes_of_one_machine_time_their_passes_in_turn_and_other_machines_beside_them(tmp_path):
    """edge-1 and edge-2 on machine a, edge-3 on machine b: edge-3 times beside edge-1, edge-2 only after edge-1."""
    specs = load_cluster(write_cluster(tmp_path)).nodes

    async def run():
        servers = []
        try:
            served = [await serving(spec, servers, machine) for spec, machine in zip(specs, "aab")]
            (first, second, elsewhere), nodes = zip(*served)
            task = asyncio.create_task(time_passes_again(nodes, timeout_s=60))
            await asyncio.wait_for(asyncio.gather(first.called.wait(), elsewhere.called.wait()), 10)
            await asyncio.sleep(0.2)  # time enough for a call that should not be made yet
            assert not second.called.is_set()
            first.answer.set()
            await asyncio.wait_for(second.called.wait(), 10)
            second.answer.set()
            elsewhere.answer.set()
            await asyncio.wait_for(task, 10)
            assert all(list(node.info.pass_times) == TIMED for node in nodes)
            for node in nodes:
                await node.disconnect()
        finally:
            for server in servers:
                await server.stop(grace=None)

    asyncio.run(run())
