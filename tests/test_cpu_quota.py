"""EMULATION for benchmarks: a node given `emulated_cpu_share` runs under a real CPU quota of its own (cgroups),
serves the same text, and removes its group when it stops; where cgroups cannot be written it says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.launcher import LocalCluster
from nodes.cpu_quota import CpuQuota
from runtime.client import Client
from runtime.core.bundle import load_bundle
from runtime.core.errors import SpeedError
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from tests.conftest import write_cluster

PROMPT = "ROMEO:"


def quota_of(pid: int) -> tuple[Path, str]:
    """The cpu cgroup directory of a process and its quota and period in microseconds, as the kernel holds them."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):  # cgroup v1
            directory = Path("/sys/fs/cgroup/cpu") / path.lstrip("/")
            return directory, (f"{(directory / 'cpu.cfs_quota_us').read_text().strip()} "
                               f"{(directory / 'cpu.cfs_period_us').read_text().strip()}")
        if number == "0" and Path("/sys/fs/cgroup/cgroup.controllers").is_file():  # cgroup v2
            directory = Path("/sys/fs/cgroup") / path.lstrip("/")
            return directory, (directory / "cpu.max").read_text().strip()
    raise AssertionError(f"process {pid} is in no cpu cgroup")


@pytest.mark.cluster
def test_a_node_with_a_cpu_share_runs_under_that_quota_and_serves_the_same_text(tmp_path, state_dir):
    path = write_cluster(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["nodes"][1]["emulated_cpu_share"] = 0.5
    path.write_text(yaml.safe_dump(spec))
    bundle = load_bundle()
    expected = generate_plain(open_stage_model(bundle), bundle.tokenizer().encode(PROMPT).ids, max_new_tokens=16,
                              eos_id=-1).token_ids
    with LocalCluster(path) as cluster:
        group, quota = quota_of(cluster.processes["edge-2"].pid)
        assert group.name == f"speed-{spec['cluster']}-edge-2" and quota == "1000 2000"  # 1 ms of every 2 ms
        assert quota_of(cluster.processes["edge-1"].pid)[0] != group  # only the node it was given to
        with Client(cluster.endpoint) as client:
            # it tells the coordinator that its passes keep half a core busy, on the machine the others share
            nodes = {node.name: node for node in client.status().nodes}
            assert (nodes["edge-2"].cores_used, nodes["edge-1"].cores_used) == (0.5, 1.0)
            assert nodes["edge-2"].machine == nodes["edge-1"].machine
            for speculative in (False, True):
                result = client.generate(PROMPT, max_new_tokens=16, speculative=speculative, ignore_eos=True)
                assert result.result().token_ids == expected
    assert not group.exists()  # the node removed its group when it stopped


def test_where_cgroups_cannot_be_written_the_node_says_so(tmp_path):
    with pytest.raises(SpeedError, match="emulated_cpu_share needs a cgroup CPU controller this user may write"):
        CpuQuota(0.5, "speed-test", root=tmp_path)
