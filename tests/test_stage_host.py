"""A node's stage host on its own (no gRPC): sequences nobody steps are freed after the idle timeout.
The shipped demo bundle serves: what is checked does not depend on what the model learned."""

import grpc
import numpy as np
import pytest

from nodes.host import StageHost, StepRefused
from runtime.core.bundle import load_bundle
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.wire import speed_pb2 as pb
from runtime.wire.tensor import pack


@pytest.fixture(scope="module")
def demo_bundle():
    return load_bundle().path


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_sequence_nobody_steps_is_freed_after_the_idle_timeout_and_others_stay(demo_bundle):
    clock = Clock()
    host = StageHost(OnnxStageModel(load_bundle(demo_bundle), threads=1), name="edge-1", stages=(0,), max_sequences=4,
                     idle_timeout_s=30, clock=clock)
    host.step(pb.StepBatch(opens=[pb.OpenSequence(seq_id=1, capacity=16), pb.OpenSequence(seq_id=2, capacity=16)]))
    clock.now = 20
    host.step(pb.StepBatch(items=[pb.StepItem(seq_id=2, start=0, length=3, stage=0, tokens=[5, 6, 7])]))
    clock.now = 40  # sequence 1 idle for 40 s, sequence 2 for 20 s
    assert host.expire_idle() == [1]
    assert host.open_sequences == 1
    with pytest.raises(StepRefused, match="sequence 1 is not open") as refused:
        host.step(pb.StepBatch(items=[pb.StepItem(seq_id=1, start=0, length=1, stage=0, tokens=[5])]))
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    reply = host.step(pb.StepBatch(items=[pb.StepItem(seq_id=2, start=3, length=1, stage=0, tokens=[8])]))
    assert [r.seq_id for r in reply.results] == [2]


def host_of(demo_bundle, *, stages=(0,), max_sequences=2) -> StageHost:
    return StageHost(OnnxStageModel(load_bundle(demo_bundle), threads=1), name="edge-1", stages=stages,
                     max_sequences=max_sequences, idle_timeout_s=300, hostable=(0, 1, 2))


def opens(*seq_ids: int, incarnation: int = 0) -> pb.StepBatch:
    return pb.StepBatch(incarnation=incarnation, opens=[pb.OpenSequence(seq_id=s, capacity=16) for s in seq_ids])


def test_closes_apply_before_opens_so_a_full_node_takes_a_replacement_in_one_message(demo_bundle):
    host = host_of(demo_bundle)
    host.step(opens(1, 2))
    host.step(pb.StepBatch(closes=[1], opens=[pb.OpenSequence(seq_id=3, capacity=16)]))
    assert sorted(host.executor.open_sequences) == [2, 3]


def test_a_refused_message_still_frees_what_it_closes(demo_bundle):
    host = host_of(demo_bundle)
    host.step(opens(1, 2))
    with pytest.raises(StepRefused, match="holds at most 2 sequences"):
        host.step(pb.StepBatch(closes=[1], opens=[pb.OpenSequence(seq_id=s, capacity=16) for s in (3, 4)]))
    assert host.executor.open_sequences == [2]


def test_an_assignment_changes_the_stages_and_frees_every_sequence(demo_bundle):
    host = host_of(demo_bundle)
    host.step(opens(1))
    host.assign(5, [0, 2])
    assert host.stages == (0, 2) and host.open_sequences == 0 and host.incarnation == 5
    host.step(opens(7, incarnation=5))
    reply = host.step(pb.StepBatch(incarnation=5, items=[
        pb.StepItem(seq_id=7, start=0, length=2, stage=0, tokens=[5, 6]),
        pb.StepItem(seq_id=7, start=0, length=2, stage=2, hidden=pack(np.zeros((2, host.cfg.d_model), np.float32)))]))
    assert sorted(r.prediction >= 0 for r in reply.results) == [True, True]


def test_a_stage_whose_graph_the_node_lacks_is_refused(demo_bundle):
    host = StageHost(OnnxStageModel(load_bundle(demo_bundle), threads=1), name="edge-1", stages=(0,), max_sequences=2,
                     idle_timeout_s=300)
    with pytest.raises(StepRefused, match="holds the graphs of stages .0., not of stage 1; list it under the node's "
                                          "standby_stages") as refused:
        host.assign(1, [0, 1])
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and host.stages == (0,)


def test_an_older_incarnation_can_neither_assign_nor_step_and_a_newer_one_frees_everything(demo_bundle):
    host = host_of(demo_bundle)
    host.assign(10, [0, 1])
    host.step(opens(1, incarnation=10))
    with pytest.raises(StepRefused, match="serves coordinator incarnation 10; an older one .9."):
        host.assign(9, [0])
    with pytest.raises(StepRefused, match="serves coordinator incarnation 10, not 9") as refused:
        host.step(pb.StepBatch(incarnation=9, closes=[1]))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and host.open_sequences == 1
    host.adopt(10)  # the same coordinator registering the node again changes nothing
    assert host.open_sequences == 1
    host.adopt(11)  # a new coordinator: back to the node's own stages, nothing held
    assert (host.incarnation, host.stages, host.open_sequences) == (11, (0,), 0)
