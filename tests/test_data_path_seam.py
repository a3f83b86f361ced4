"""The engine drives any data path through the DataPath seam: a third path, written here, decodes a request
to the end with placement, assignment and results as the two real ones get them."""

from __future__ import annotations

import asyncio
import contextlib

from runtime.coordinator.cluster_view import ClusterView
from runtime.coordinator.data_path import DataPath, data_path_for
from runtime.coordinator.engine import Engine
from runtime.coordinator.lockstep import LockstepPath
from runtime.coordinator.metrics import CoordinatorMetrics
from runtime.coordinator.remote_node import RemoteNode
from runtime.coordinator.requests import Request
from runtime.coordinator.ring_link import RingDialler
from runtime.coordinator.ring_path import RingPath
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import DataPathKind, load_cluster
from runtime.core.generation import GenerationOptions, GenerationResult
from runtime.core.node_state import NodeState
from runtime.core.ring_ledger import RingLedger
from runtime.core.scheduler import SequenceState
from runtime.core.stopping import StopStrings
from runtime.core.text_stream import TextStream
from runtime.wire import speed_pb2 as pb
from tests.conftest import write_cluster

PROMPT = [5, 6, 7]


class CountingPath:
    """Commits token p % 97 at position p, one position of every sequence per round, and numbers its
    assignments."""

    def __init__(self, view: ClusterView):
        self.view = view
        self.ledger = RingLedger(view.config.n_stages)
        self.assignments = 0

    def assignment(self, placement: dict[int, str]) -> dict:
        self.assignments += 1
        return {"epoch": self.assignments}

    async def replay(self, active: dict[int, Request]) -> None:
        for seq_id in active:
            self.ledger.rewind(seq_id)

    def forget(self) -> None:
        pass

    def add(self, seq_id: int, request: Request) -> SequenceState:
        return self.ledger.add(seq_id, request.prompt_ids, **self.view.sequence_options(request))

    def sequence(self, seq_id: int) -> SequenceState:
        return self.ledger.sequences[seq_id]

    async def advance(self, wake: asyncio.Event) -> list[tuple[int, str]]:
        await asyncio.sleep(0)
        for seq in list(self.ledger.sequences.values()):
            if not seq.done:
                position = len(seq.prompt) + len(seq.generated)
                self.ledger.commit(seq.seq_id, position, position % 97)
        return []

    async def idle(self) -> None:
        pass

    def settled(self, seq_id: int) -> bool:
        return True

    def end(self, seq_id: int) -> None:
        self.ledger.remove(seq_id)


def serving_nodes(tmp_path, assigned: list) -> list[RemoteNode]:
    """The nodes of a three-node cluster file, registered and serving; an assignment is only recorded."""
    nodes = []
    for spec in load_cluster(write_cluster(tmp_path)).nodes:
        node = RemoteNode(spec, step_timeout_s=1.0)
        node.info = pb.NodeInfo(name=spec.name, stages=spec.stages, max_sequences=4)
        node.state = NodeState.SERVING

        async def assign(incarnation, stages, node=node, **extras):
            node.assigned = tuple(stages)
            assigned.append((node.name, tuple(stages), extras))

        node.assign = assign
        nodes.append(node)
    return nodes


def test_a_third_data_path_drives_the_engine_to_the_end_of_a_request(tmp_path):
    bundle = load_bundle()
    tokenizer = bundle.tokenizer()
    assigned: list = []
    engine = Engine(serving_nodes(tmp_path, assigned), config=bundle.config, eos_id=bundle.eos_token_id, max_queue=4,
                    incarnation=1, metrics=CoordinatorMetrics(), data_path=CountingPath)
    no_stop = StopStrings(tokenizer, [])
    request = Request(PROMPT, GenerationOptions(max_new_tokens=5, ignore_eos=True), speculative=False,
                      guess_thresholds=(), stop=no_stop, text=TextStream(tokenizer, no_stop))

    async def decode() -> tuple[list[int], GenerationResult]:
        loop = asyncio.create_task(engine.run())
        engine.submit(request)
        streamed = []
        try:
            while True:
                event = await asyncio.wait_for(request.events.get(), timeout=10)
                if isinstance(event, GenerationResult):
                    return streamed, event
                streamed += event.token_ids
        finally:
            loop.cancel()

    streamed, finished = asyncio.run(decode())
    expected = [position % 97 for position in range(len(PROMPT), len(PROMPT) + 5)]
    assert streamed == list(finished.token_ids) == expected
    assert sorted(assigned) == [("edge-1", (0,), {"epoch": 1}), ("edge-2", (1,), {"epoch": 1}),
                                ("edge-3", (2,), {"epoch": 1})]


def test_a_request_decoding_while_nodes_time_their_passes_measures_no_rate(tmp_path):
    """`speed plan` and placement: auto fit their costs to the rates of requests that decoded alone; a node
    timing its passes between steps slows the request beside it."""
    bundle = load_bundle()
    tokenizer = bundle.tokenizer()
    engine = Engine(serving_nodes(tmp_path, []), config=bundle.config, eos_id=bundle.eos_token_id, max_queue=4,
                    incarnation=1, metrics=CoordinatorMetrics(), data_path=CountingPath)
    no_stop = StopStrings(tokenizer, [])

    async def decode(during_timing: bool) -> None:
        request = Request(PROMPT, GenerationOptions(max_new_tokens=5, ignore_eos=True), speculative=False,
                          guess_thresholds=(), stop=no_stop, text=TextStream(tokenizer, no_stop))
        loop = asyncio.create_task(engine.run())
        try:
            with engine.timing_nodes() if during_timing else contextlib.nullcontext():
                engine.submit(request)
                while not isinstance(await asyncio.wait_for(request.events.get(), timeout=10), GenerationResult):
                    pass
        finally:
            loop.cancel()

    asyncio.run(decode(during_timing=True))
    assert engine.measured_tokens_per_s(False) == 0
    asyncio.run(decode(during_timing=False))
    assert engine.measured_tokens_per_s(False) > 0


def test_the_cluster_file_names_one_of_the_two_data_paths(tmp_path):
    view = ClusterView(config=load_bundle().config, nodes={}, metrics=CoordinatorMetrics(), incarnation=1, eos_id=0)
    made = {kind: data_path_for(kind, prefill_chunk=64, stall_timeout_s=5.0, dial=RingDialler(""))(view)
            for kind in DataPathKind}
    assert isinstance(made[DataPathKind.LOCKSTEP], LockstepPath) and isinstance(made[DataPathKind.RING], RingPath)
    seam = {name for name in vars(DataPath) if not name.startswith("_")}
    assert {"assignment", "replay", "forget", "add", "advance", "end"} <= seam
    for path in [*made.values(), CountingPath(view)]:  # each has every method the seam declares
        assert all(callable(getattr(path, name, None)) for name in seam), type(path).__name__
    assert made[DataPathKind.LOCKSTEP].assignment({0: "edge-1"}) == {}
    assert load_cluster(write_cluster(tmp_path, extra_top_keys="data_path: ring\n")).data_path is DataPathKind.RING
