"""Nodes on one machine share its cores: when their passes together want more cores than it has, each runs
slower, as the kernel's fair scheduler shares them. Pure: no I/O.

Each busy node wants the cores one of its passes keeps busy (its threads, capped by its CPU quota). The
machine's cores go to them max-min fairly, the kernel's way: a node that wants less than an equal share gets
what it wants, the others split the rest equally. A node given a fraction of what it wants progresses at
that fraction of the speed it measured alone. Which of its passes a node runs and when is the timing
models' business (runtime/core/ring_timing.py, lockstep_timing.py); this only says when each one ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


def fair_speeds(wants: Mapping[str, float], cores: float) -> dict[str, float]:
    """Each node's speed, 1 = as fast as alone, when these nodes want these many cores each at once."""
    speeds, left, sharing = {}, cores, len(wants)
    for name, want in sorted(wants.items(), key=lambda item: item[1]):
        given = min(want, left / sharing)
        speeds[name] = given / want if want > 0 else 1.0
        left, sharing = left - given, sharing - 1
    return speeds


@dataclass
class SharedMachine:
    """The busy nodes of one machine and the work (milliseconds alone) each has left."""

    cores: float
    _left: dict[str, float] = field(default_factory=dict)
    _wants: dict[str, float] = field(default_factory=dict)
    _speeds: dict[str, float] = field(default_factory=dict)
    _since: float = 0.0

    def start(self, name: str, work_ms: float, wants: float, now: float) -> None:
        self._advance(now)
        self._left[name], self._wants[name] = work_ms, wants
        self._speeds = fair_speeds(self._wants, self.cores)

    def finish(self, name: str, now: float) -> None:
        self._advance(now)
        del self._left[name], self._wants[name]
        self._speeds = fair_speeds(self._wants, self.cores)

    def ends(self) -> dict[str, float]:
        """When each busy node's work ends if nothing starts or ends before."""
        return {name: self._since + max(0.0, left) / self._speeds[name] for name, left in self._left.items()}

    def _advance(self, now: float) -> None:
        for name in self._left:
            self._left[name] -= (now - self._since) * self._speeds[name]
        self._since = now


def shared_ends(works: Mapping[str, tuple[float, float]], cores: float) -> dict[str, float]:
    """When each node's work ends if all start together on one machine. works: node -> (ms alone, cores wanted)."""
    machine, ends = SharedMachine(cores), {}
    for name, (ms, wants) in works.items():
        machine.start(name, ms, wants, 0.0)
    while machine.ends():
        name, at = min(machine.ends().items(), key=lambda item: (item[1], item[0]))
        machine.finish(name, at)
        ends[name] = at
    return ends
