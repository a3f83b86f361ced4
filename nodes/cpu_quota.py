"""EMULATION for benchmarks only: a node made really slower, as a slower device would be, by a CPU quota
on its own process (`emulated_cpu_share` in the cluster file).

The node moves itself into a cgroup of its own whose CPU controller lets it run `share` of one core in
every period (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), and moves back out and removes the group
when it stops. The kernel enforces it: the node's passes take longer in wall time while other processes
get the cores, unlike a sleep. A quota caps the share over each period, so the period is the shortest
the kernel allows (a quota of at least 1 ms): work longer than a period runs `1 / share` times slower,
shorter bursts only once the period's budget is spent (the demo model's passes of half a millisecond
slow less than SmolLM2's of a few milliseconds). Where cgroups cannot be written (no permission, no CPU
controller), the node refuses to start rather than run unslowed under a label that says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from nodes.machine import CGROUP_ROOT, cpu_cgroup
from runtime.core.errors import SpeedError

MIN_QUOTA_US = 1000  # the kernel's smallest quota and period
MAX_PERIOD_US = 1_000_000


class CpuQuota:
    """This process's CPU quota; `release` undoes it."""

    def __init__(self, share: float, group: str, *, root: Path = CGROUP_ROOT):
        found = cpu_cgroup(root)
        if found is None:
            raise SpeedError("emulated_cpu_share needs a cgroup CPU controller, and this process is in none; "
                             "remove the key")
        _, v2, self._parent = found
        self.directory = self._parent / group
        period = min(MAX_PERIOD_US, max(MIN_QUOTA_US, round(MIN_QUOTA_US / share)))
        quota = max(MIN_QUOTA_US, round(share * period))
        try:
            self.directory.mkdir(exist_ok=True)  # a node killed before it released leaves its group: reused
            if v2:
                (self.directory / "cpu.max").write_text(f"{quota} {period}")
            else:
                (self.directory / "cpu.cfs_quota_us").write_text("-1")  # a period shorter than the quota is refused
                (self.directory / "cpu.cfs_period_us").write_text(str(period))
                (self.directory / "cpu.cfs_quota_us").write_text(str(quota))
            (self.directory / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            raise SpeedError(f"emulated_cpu_share needs a cgroup CPU controller this user may write ({self.directory}: "
                             f"{exc.strerror or exc}); run the node where it may, or remove the key") from None

    def release(self) -> None:
        """Back into the group it came from; the emulation's group goes."""
        try:
            (self._parent / "cgroup.procs").write_text(str(os.getpid()))
            self.directory.rmdir()
        except OSError:
            pass  # another process of the group still runs, or the group went already

