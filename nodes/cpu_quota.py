"""EMULATION for benchmarks only: a node made really slower, as a slower device would be, by a CPU quota
on its own process (`emulated_cpu_share` in the cluster file).

The node moves itself into a cgroup of its own whose CPU controller lets it run `share` of one core in
every 100 ms period (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), and moves back out and removes the
group when it stops. The kernel enforces it: the node's passes take longer in wall time while other
processes get the cores, unlike a sleep. Where cgroups cannot be written (no permission, no CPU
controller), the node refuses to start rather than run unslowed under a label that says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.core.errors import SpeedError

PERIOD_US = 100_000
CGROUP_ROOT = Path("/sys/fs/cgroup")


class CpuQuota:
    """This process's CPU quota; `release` undoes it."""

    def __init__(self, share: float, group: str, *, root: Path = CGROUP_ROOT):
        v2 = (root / "cgroup.controllers").is_file()
        hierarchy = root if v2 else root / "cpu"
        self._parent = _own_group(hierarchy, v2)
        self.directory = self._parent / group
        quota = max(1000, round(share * PERIOD_US))  # the kernel's smallest quota is 1 ms
        try:
            self.directory.mkdir(exist_ok=True)  # a node killed before it released leaves its group: reused
            if v2:
                (self.directory / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (self.directory / "cpu.cfs_period_us").write_text(str(PERIOD_US))
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


def _own_group(hierarchy: Path, v2: bool) -> Path:
    """The directory of the cgroup this process is in, in `hierarchy`."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if (v2 and number == "0") or (not v2 and "cpu" in controllers.split(",")):
            return hierarchy / path.lstrip("/")
    raise SpeedError("emulated_cpu_share needs a cgroup CPU controller, and this process is in none; "
                     "remove the key")
