"""Which machine a node runs on and how much of its CPU a pass uses, so that a placement's timing model knows
which nodes share cores: on one machine, three nodes' passes running at once take longer than one alone.

The machine is named by the running kernel's boot id, which every process and container on one machine
reads alike and no two machines share. A pass keeps busy as many cores as the node has threads (ONNX
Runtime's default, 0, is one per core), at most the cores the process may run on, and at most what the
CPU quota of its cgroup (or of any group above it) allows.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from runtime.wire import speed_pb2 as pb

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def this_machine() -> pb.Machine:
    try:
        machine_id = BOOT_ID.read_text().strip()
    except OSError:
        machine_id = socket.gethostname()  # not Linux: the host name is what is left
    return pb.Machine(id=machine_id, cores=float(_cores()))


def cores_used(threads: int, *, root: Path = CGROUP_ROOT) -> float:
    """How many cores a pass with `threads` intra-op threads (0: one per core) keeps busy on this machine."""
    cores = _cores()
    wanted = min(threads, cores) if threads > 0 else cores
    limit = quota_cores(root=root)
    return float(min(wanted, limit)) if limit is not None else float(wanted)


def quota_cores(*, root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota on this process's cgroup and the groups above it, in cores; None without one."""
    found = cpu_cgroup(root)
    if found is None:
        return None
    hierarchy, _, own = found
    limits = []
    for group in [own, *[parent for parent in own.parents if parent.is_relative_to(hierarchy)]]:
        v2 = group / "cpu.max"
        v1 = group / "cpu.cfs_quota_us"
        try:
            if v2.is_file():
                quota, period = v2.read_text().split()
                if quota != "max":
                    limits.append(int(quota) / int(period))
            elif v1.is_file():
                quota_us = int(v1.read_text())
                if quota_us > 0:
                    limits.append(quota_us / int((group / "cpu.cfs_period_us").read_text()))
        except (OSError, ValueError):
            continue  # a group this process may not read: its limit stays unknown
    return min(limits) if limits else None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_cgroup(root: Path = CGROUP_ROOT) -> tuple[Path, bool, Path] | None:
    """(the hierarchy holding the CPU controller, whether it is cgroup v2, this process's group in it); None
    where this process is in no CPU cgroup."""
    v2 = (root / "cgroup.controllers").is_file()
    hierarchy = root if v2 else root / "cpu"
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if (v2 and number == "0") or (not v2 and "cpu" in controllers.split(",")):
            return hierarchy, v2, hierarchy / path.lstrip("/")
    return None
