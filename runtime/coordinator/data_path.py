"""The seam between the engine and the ways a token's work travels between nodes.

The engine keeps admission, placement, failover and results; a data path carries the work of the
sequences it is given and tells the engine what they committed. Two implement it: LockstepPath (the
SPEED scheduler's ticks, a round trip through the coordinator each) and RingPath (node to node).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from runtime.coordinator.cluster_view import ClusterView
from runtime.coordinator.lockstep import LockstepPath
from runtime.coordinator.requests import Request
from runtime.coordinator.ring_link import RingDialler
from runtime.coordinator.ring_path import RingPath
from runtime.core.cluster_file import DataPathKind
from runtime.core.scheduler import SequenceState


class DataPath(Protocol):
    def assignment(self, placement: dict[int, str]) -> dict:
        """What Assign tells every node besides its stages, for this placement (keyword arguments)."""

    async def replay(self, active: dict[int, Request]) -> None:
        """The nodes were just assigned (which freed everything): start every active sequence again from
        its prompt and committed tokens."""

    def forget(self) -> None:
        """The placement is gone: what was on the way is void."""

    def add(self, seq_id: int, request: Request) -> SequenceState:
        """Start decoding an admitted request; its SequenceState records what is committed."""

    def sequence(self, seq_id: int) -> SequenceState: ...

    async def advance(self, wake: asyncio.Event) -> list[tuple[int, str]]:
        """Move the work on until something is committed or `wake` is set; the sequences that failed, with
        the reason."""

    async def idle(self) -> None:
        """Nothing is decoding: send what is still owed to the nodes (closes)."""

    def settled(self, seq_id: int) -> bool:
        """A finished sequence may be reported: every node is done with it."""

    def end(self, seq_id: int) -> None:
        """Forget a sequence and free its caches on the nodes."""


def data_path_for(kind: DataPathKind, *, prefill_chunk: int, stall_timeout_s: float,
                  dial: RingDialler) -> Callable[[ClusterView], DataPath]:
    """The data path a cluster file names, made once the engine has its view of the cluster; dial: opens the ring's
    links to the nodes."""
    if kind == DataPathKind.RING:
        return lambda view: RingPath(view, stall_timeout_s=stall_timeout_s, dial=dial)
    return lambda view: LockstepPath(view, prefill_chunk=prefill_chunk)
