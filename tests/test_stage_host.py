"""A node's stage host on its own (no gRPC): sequences nobody steps are freed after the idle timeout."""

import grpc
import pytest

from nodes.executor import OnnxStageModel
from nodes.host import StageHost, StepRefused
from runtime.bundle import load_bundle
from runtime.wire import speed_pb2 as pb


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_sequence_nobody_steps_is_freed_after_the_idle_timeout_and_others_stay(tiny_bundle):
    clock = Clock()
    host = StageHost(OnnxStageModel(load_bundle(tiny_bundle), threads=1), name="edge-1", stages=(0,), max_sequences=4,
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
