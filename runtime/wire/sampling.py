"""Sampling settings on the wire."""

from __future__ import annotations

from runtime.core.sampling import SamplingParams
from runtime.wire import speed_pb2 as pb


def sampling_from_wire(sampling: pb.Sampling) -> SamplingParams:
    """Raises SpeedError with a sentence when a setting is out of range."""
    return SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k, top_p=top_p_of(sampling),
                          seed=sampling.seed)


def top_p_of(sampling: pb.Sampling) -> float:
    return sampling.top_p or 1.0  # unset (0) means 1: no nucleus cut


def sampling_to_wire(sampling: SamplingParams) -> pb.Sampling:
    return pb.Sampling(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed)
