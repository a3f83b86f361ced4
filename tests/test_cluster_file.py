"""The cluster file: the shipped example loads, defaults apply, and every mistake is one sentence with its key path."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from runtime.core.cluster_file import (
    ClusterSpec,
    CoordinatorSpec,
    DataPathKind,
    NodeSpec,
    PlacementKind,
    SpeculationSpec,
    load_cluster,
    parse_address,
)
from runtime.core.errors import SpeedError

LOCAL = Path(__file__).resolve().parents[1] / "deploy" / "local.yaml"

MINIMAL = {
    "cluster": "test",
    "coordinator": {"address": "127.0.0.1:50050"},
    "nodes": [
        {"name": "edge-1", "address": "127.0.0.1:50051", "stages": [0]},
        {"name": "edge-2", "address": "127.0.0.1:50052", "stages": [1]},
        {"name": "edge-3", "address": "127.0.0.1:50053", "stages": [2]},
    ],
}


def write(tmp_path: Path, data: dict | str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def cluster_with(tmp_path: Path, edit) -> Path:
    """A copy of MINIMAL changed by `edit(data)`, written to a file."""
    data = copy.deepcopy(MINIMAL)
    edit(data)
    return write(tmp_path, data)


def fails(path: Path, message: str) -> None:
    """Loading `path` raises one sentence that starts with the file as given and contains `message`."""
    with pytest.raises(SpeedError, match=re.escape(message)) as caught:
        load_cluster(str(path))
    assert "\n" not in str(caught.value)


# --- what loads --------------------------------------------------------------------------------


def test_the_shipped_local_cluster_loads_and_covers_the_demo_stages():
    spec = load_cluster(LOCAL)
    assert spec.name == "local-demo" and spec.bundle is None and spec.path == LOCAL
    assert spec.coordinator == CoordinatorSpec(address="127.0.0.1:50050", http_address="127.0.0.1:50080")
    assert [node.name for node in spec.nodes] == ["edge-1", "edge-2", "edge-3"]
    assert [node.stages for node in spec.nodes] == [(0,), (1,), (2,)]
    assert [node.address for node in spec.nodes] == ["127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"]
    assert all(node.device == "cpu" and node.threads == 1 for node in spec.nodes)
    spec.check_stages(3)
    assert spec.owner_of(1).name == "edge-2"
    assert spec.node("edge-3").stages == (2,)


def test_the_shipped_file_documents_that_link_latency_is_emulation():
    assert "emulated_link_ms is EMULATION for benchmarks" in LOCAL.read_text()


def test_defaults_are_applied(tmp_path):
    spec = load_cluster(write(tmp_path, MINIMAL))
    assert spec.speculation == SpeculationSpec(enabled=True, prefill_chunk=64)
    assert spec.coordinator.step_timeout_s == 3.0 and spec.coordinator.heartbeat_interval_s == 1.0
    assert spec.nodes[0] == NodeSpec(name="edge-1", address="127.0.0.1:50051", stages=(0,), device="cpu",
                                     cpu_fallback=False, threads=1, max_sequences=8, idle_timeout_s=300.0,
                                     emulated_link_ms=0.0)
    assert spec.data_path is DataPathKind.RING and spec.placement is PlacementKind.FILE
    assert spec.bundle is None and spec.path == (tmp_path / "cluster.yaml").resolve()


def test_every_setting_is_read(tmp_path):
    def edit(data):
        data["coordinator"].update(step_timeout_s=0.5, heartbeat_interval_s=2, http_address="[::1]:8000")
        data["speculation"] = {"enabled": False, "prefill_chunk": 16, "guess_threshold": 0.25, "window": 8}
        data["data_path"] = "lockstep"  # not the default
        data["nodes"][0].update(device="cuda", cpu_fallback=True, threads=0, max_sequences=2, idle_timeout_s=30,
                                emulated_link_ms=5)
        data["nodes"][1]["stages"] = [1, 2]
        del data["nodes"][2]

    spec = load_cluster(cluster_with(tmp_path, edit))
    assert spec.coordinator == CoordinatorSpec("127.0.0.1:50050", step_timeout_s=0.5, heartbeat_interval_s=2.0,
                                               http_address="[::1]:8000")
    assert spec.speculation == SpeculationSpec(enabled=False, prefill_chunk=16, guess_threshold=0.25, window=8)
    assert spec.data_path is DataPathKind.LOCKSTEP
    assert spec.nodes[0] == NodeSpec("edge-1", "127.0.0.1:50051", (0,), device="cuda", cpu_fallback=True, threads=0,
                                     max_sequences=2, idle_timeout_s=30.0, emulated_link_ms=5.0)
    assert isinstance(spec.nodes[0].idle_timeout_s, float)
    spec.check_stages(3)
    assert spec.owner_of(2).name == "edge-2"


def test_a_relative_bundle_is_resolved_against_the_cluster_files_directory(tmp_path, monkeypatch):
    (tmp_path / "bundles" / "mine").mkdir(parents=True)
    (tmp_path / "clusters").mkdir()
    path = write(tmp_path / "clusters", {**MINIMAL, "bundle": "../bundles/mine"})
    monkeypatch.chdir("/")  # the working directory must not matter
    assert load_cluster(path).bundle == (tmp_path / "bundles" / "mine").resolve()


def test_an_absolute_bundle_is_kept(tmp_path):
    (tmp_path / "b").mkdir()
    path = write(tmp_path, {**MINIMAL, "bundle": str(tmp_path / "b")})
    assert load_cluster(path).bundle == (tmp_path / "b").resolve()


def test_ipv6_addresses_are_written_in_brackets(tmp_path):
    assert parse_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_address("[::1]:7") == ("::1", 7)
    assert parse_address("node-a.lan:443") == ("node-a.lan", 443)
    path = write(tmp_path, 'cluster: v6\ncoordinator: {address: "[::1]:50050"}\n'
                           'nodes:\n  - {name: a, address: "[::1]:50051", stages: [0]}\n')
    assert load_cluster(path).nodes[0].address == "[::1]:50051"


@pytest.mark.parametrize("text", ["127.0.0.1", ":50051", "host:", "host:port", "host:0", "host:65536", "::1:50051",
                                  "[nonsense]:1", "a b:1", "host:-1"])
def test_a_bad_address_is_a_sentence(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_address(text)


def test_with_emulated_link_ms_replaces_every_nodes_latency(tmp_path):
    spec = load_cluster(write(tmp_path, MINIMAL))
    slow = spec.with_emulated_link_ms(20)
    assert [node.emulated_link_ms for node in slow.nodes] == [20.0, 20.0, 20.0]
    assert [node.emulated_link_ms for node in spec.nodes] == [0.0, 0.0, 0.0]  # the original is untouched
    assert slow.nodes[1].stages == spec.nodes[1].stages and slow.coordinator == spec.coordinator
    with pytest.raises(SpeedError, match="must be a number of milliseconds >= 0"):
        spec.with_emulated_link_ms(-1)


# --- the file itself -----------------------------------------------------------------------------


def test_a_missing_file_is_named_as_given(tmp_path):
    with pytest.raises(SpeedError, match=re.escape(f"cluster file {tmp_path}/nope.yaml does not exist")):
        load_cluster(tmp_path / "nope.yaml")


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "cluster: x\nnodes:\n  - name: [edge\n")
    fails(path, f"{path} is not valid YAML: ")
    with pytest.raises(SpeedError, match=r"line \d+, column \d+"):
        load_cluster(path)


def test_an_unquoted_ipv6_address_is_a_yaml_error_with_its_line(tmp_path):
    path = write(tmp_path, "cluster: x\ncoordinator:\n  address: [::1]:50050\n")
    fails(path, "is not valid YAML: expected the node content, but found ':' at line 3")


@pytest.mark.parametrize("text, got", [("", "null"), ("- a\n- b\n", "a list"), ("just text\n", "'just text'")])
def test_the_top_level_must_be_a_mapping(tmp_path, text, got):
    path = write(tmp_path, text)
    fails(path, f"{path}: expected a mapping with cluster, coordinator and nodes at the top level, got {got}")


# --- keys ------------------------------------------------------------------------------------------


def test_an_unknown_node_key_is_named_with_a_suggestion(tmp_path):
    def edit(data):
        data["nodes"][1]["stage"] = data["nodes"][1].pop("stages")

    path = cluster_with(tmp_path, edit)
    fails(path, f"{path}: nodes[1]: unknown key 'stage'; expected one of address, cpu_fallback, device, "
                "emulated_cpu_share, emulated_link_ms, idle_timeout_s, link_port, max_sequences, metrics_port, name, "
                "stages, standby_stages, threads (did you mean 'stages'?)")


def test_placement_auto_is_read(tmp_path):
    assert load_cluster(cluster_with(tmp_path, lambda d: d.update(placement="auto"))).placement is PlacementKind.AUTO
    spec = load_cluster(cluster_with(tmp_path, lambda d: d.update(placement="auto", data_path="lockstep")))
    assert (spec.placement, spec.data_path) == (PlacementKind.AUTO, DataPathKind.LOCKSTEP)


def test_an_unknown_key_without_a_close_match_gets_no_suggestion(tmp_path):
    path = cluster_with(tmp_path, lambda data: data.update(zzz=1))
    expected = (f"{path}: unknown key 'zzz'; expected one of bundle, cluster, coordinator, data_path, insecure, "
                "nodes, placement, secret_file, security, speculation")
    with pytest.raises(SpeedError, match=re.escape(expected)) as caught:
        load_cluster(str(path))
    assert "did you mean" not in str(caught.value)


@pytest.mark.parametrize("section, key, expected", [
    ("coordinator", "step_timeout", "coordinator: unknown key 'step_timeout'; expected one of address, "
                                    "heartbeat_interval_s, http_address, max_queue, metrics_port, step_timeout_s "
                                    "(did you mean 'step_timeout_s'?)"),
    ("speculation", "enable", "speculation: unknown key 'enable'; expected one of enabled, guess_threshold, "
                              "prefill_chunk, window (did you mean 'enabled'?)"),
])
def test_unknown_keys_in_sections(tmp_path, section, key, expected):
    path = cluster_with(tmp_path, lambda data: data.setdefault(section, {}).update({key: 1}))
    fails(path, f"{path}: {expected}")


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.pop("cluster"), ": missing 'cluster' (a name for this cluster, e.g. local-demo)"),
    (lambda d: d.pop("nodes"), ": missing 'nodes' (a list of nodes, each with name, address and stages)"),
    (lambda d: d.pop("coordinator"), ": missing 'coordinator' (a mapping with the coordinator's address"),
    (lambda d: d["coordinator"].pop("address"), ": coordinator: missing 'address' (host:port, e.g. 127.0.0.1:50050)"),
    (lambda d: d["nodes"][0].pop("address"), ": nodes[0]: missing 'address' (host:port, e.g. 127.0.0.1:50051)"),
    (lambda d: d["nodes"][2].pop("name"), ": nodes[2]: missing 'name' (letters, digits, '-', '_' or '.', e.g. edge-1)"),
    (lambda d: d["nodes"][1].pop("stages"), ": nodes[1]: missing 'stages' (a list of the stages this node hosts"),
])
def test_a_missing_required_key_says_what_to_write(tmp_path, edit, expected):
    path = cluster_with(tmp_path, edit)
    fails(path, f"{path}{expected}")


# --- values ----------------------------------------------------------------------------------------


def set_node_key(index: int, key: str, value):
    return lambda data: data["nodes"][index].__setitem__(key, value)


@pytest.mark.parametrize("edit, expected", [
    (set_node_key(0, "threads", "two"), "nodes[0].threads: expected a whole number >= 0, got 'two'"),
    (set_node_key(0, "threads", 1.5), "nodes[0].threads: expected a whole number >= 0, got 1.5"),
    (set_node_key(0, "threads", 2.0), "nodes[0].threads: expected a whole number >= 0, got 2.0"),
    (set_node_key(0, "threads", -1), "nodes[0].threads: expected a whole number >= 0, got -1"),
    (set_node_key(1, "max_sequences", 0), "nodes[1].max_sequences: expected a whole number >= 1, got 0"),
    (set_node_key(1, "idle_timeout_s", 0), "nodes[1].idle_timeout_s: expected a number > 0, got 0"),
    (set_node_key(1, "idle_timeout_s", "5m"), "nodes[1].idle_timeout_s: expected a number > 0, got '5m'"),
    (set_node_key(2, "emulated_link_ms", -0.5), "nodes[2].emulated_link_ms: expected a number >= 0, got -0.5"),
    (set_node_key(2, "emulated_link_ms", float("nan")), "nodes[2].emulated_link_ms: expected a number >= 0, got nan"),
    (set_node_key(2, "emulated_cpu_share", 0), "nodes[2].emulated_cpu_share: expected a number > 0, got 0"),
    (set_node_key(0, "cpu_fallback", "no"), "nodes[0].cpu_fallback: expected true or false, got 'no'"),
    (set_node_key(0, "device", "gpu"), "nodes[0].device: expected one of cpu, cuda, got 'gpu'"),
    (set_node_key(0, "device", None), "nodes[0].device: expected one of cpu, cuda, got null"),
    (set_node_key(0, "name", "edge 1"), "nodes[0].name: 'edge 1' may use only letters, digits, '-', '_' and '.'"),
    (set_node_key(0, "name", 7), "nodes[0].name: expected a non-empty string, got 7"),
    (set_node_key(0, "address", 50051), "nodes[0].address: expected host:port, e.g. 127.0.0.1:50051, got 50051"),
    (set_node_key(0, "address", "127.0.0.1"), "nodes[0].address: '127.0.0.1' is not host:port; write e.g. 127.0.0.1"),
    (set_node_key(0, "stages", 0), "nodes[0].stages: expected a list of whole numbers >= 0, e.g. [0], got 0"),
    (set_node_key(0, "standby_stages", 1),
     "nodes[0].standby_stages: expected a list of whole numbers >= 0, e.g. [0], got 1"),
    (set_node_key(0, "metrics_port", 70000), "nodes[0].metrics_port: expected a port, a whole number from 1 to 65535"),
    (lambda d: d["coordinator"].update(max_queue=-1), "coordinator.max_queue: expected a whole number >= 0, got -1"),
    (set_node_key(0, "stages", [0, "1"]), "nodes[0].stages[1]: expected a whole number >= 0, got '1'"),
    (set_node_key(0, "stages", [-1]), "nodes[0].stages[0]: expected a whole number >= 0, got -1"),
    (set_node_key(0, "stages", [0, 1, 0]), "nodes[0].stages: 0 is listed twice; list each once"),
    (lambda d: d.update(cluster=""), "cluster: expected a non-empty string, got ''"),
    (lambda d: d.update(nodes=[]), "nodes: expected a non-empty list of nodes, each with name, address and stages, got []"),
    (lambda d: d.update(nodes={"edge-1": {}}), "nodes: expected a non-empty list of nodes, each with name, address and "
                                              "stages, got a mapping"),
    (lambda d: d["nodes"].__setitem__(1, "edge-2"), "nodes[1]: expected a mapping of settings, got 'edge-2'"),
    (lambda d: d.update(coordinator="127.0.0.1:50050"), "coordinator: expected a mapping of settings, got '127.0.0.1"),
    (lambda d: d["coordinator"].update(step_timeout_s=-3), "coordinator.step_timeout_s: expected a number > 0, got -3"),
    (lambda d: d.update(speculation={"prefill_chunk": 0}), "speculation.prefill_chunk: expected a whole number >= 1, got 0"),
    (lambda d: d.update(speculation={"enabled": 1}), "speculation.enabled: expected true or false, got 1"),
    (lambda d: d.update(speculation={"guess_threshold": 1.5}),
     "speculation.guess_threshold: expected a probability from 0 to 1, got 1.5"),
    (lambda d: d.update(speculation={"guess_threshold": "high"}),
     "speculation.guess_threshold: expected a number >= 0, got 'high'"),
    (lambda d: d.update(speculation={"window": 65}),
     "speculation.window: expected a whole number >= 0 and at most 64 (more only multiplies the work a flip "
     "throws away), got 65"),
    (lambda d: d.update(data_path="star"), "data_path: expected one of lockstep, ring, got 'star'"),
    (lambda d: d.update(placement="fastest"), "placement: expected one of file, auto, got 'fastest'"),
])
def test_a_wrong_value_names_its_key_path_and_what_is_expected(tmp_path, edit, expected):
    path = cluster_with(tmp_path, edit)
    fails(path, f"{path}: {expected}")


@pytest.mark.parametrize("word", ["yes", "on", "true"])
def test_yaml_booleans_are_not_numbers(tmp_path, word):
    text = yaml.safe_dump(MINIMAL, sort_keys=False).replace("stages:\n  - 0\n", f"stages:\n  - 0\n  threads: {word}\n", 1)
    path = write(tmp_path, text)
    fails(path, f"{path}: nodes[0].threads: expected a whole number >= 0, got true")


def test_a_duplicate_node_name_is_named(tmp_path):
    path = cluster_with(tmp_path, set_node_key(2, "name", "edge-1"))
    fails(path, f"{path}: nodes[2].name: edge-1 is already the name of nodes[0]; give every node its own name")


@pytest.mark.parametrize("index, address, user", [
    (2, "127.0.0.1:50051", "edge-1"),
    (0, "127.0.0.1:50050", "the coordinator"),
])
def test_colliding_addresses_are_named(tmp_path, index, address, user):
    path = cluster_with(tmp_path, set_node_key(index, "address", address))
    fails(path, f"{path}: nodes[{index}].address: {address} is already used by {user}; "
                "give every node, the coordinator and each metrics or link port its own address")


def test_addresses_collide_by_meaning_for_ip_hosts(tmp_path):
    def edit(data):
        data["coordinator"]["address"] = "[::1]:50050"
        data["nodes"][1]["address"] = "[0:0::1]:50050"

    fails(cluster_with(tmp_path, edit), "nodes[1].address: [0:0::1]:50050 is already used by the coordinator")


def test_a_missing_bundle_directory_is_named_with_the_fix(tmp_path):
    path = write(tmp_path, {**MINIMAL, "bundle": "no-such-bundle"})
    fails(path, f"{path}: bundle: {(tmp_path / 'no-such-bundle').resolve()} does not exist; "
                "give a bundle directory written by `speed export`, relative to this file")


def test_a_bundle_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "bundle.txt").write_text("")
    fails(write(tmp_path, {**MINIMAL, "bundle": "bundle.txt"}), "bundle.txt is not a directory; give a bundle directory")


# --- the spec's questions ---------------------------------------------------------------------------


def spec_with(tmp_path: Path, *stages: list[int]) -> ClusterSpec:
    data = copy.deepcopy(MINIMAL)
    data["nodes"] = [{"name": f"edge-{i + 1}", "address": f"127.0.0.1:{50051 + i}", "stages": s}
                     for i, s in enumerate(stages)]
    return load_cluster(str(write(tmp_path, data, "x.yaml")))


def test_check_stages_names_a_stage_hosted_twice(tmp_path):
    spec = spec_with(tmp_path, [0], [1], [1, 2])
    with pytest.raises(SpeedError, match=re.escape(f"{tmp_path}/x.yaml: nodes[2].stages: stage 1 is already hosted by "
                                                   "edge-2; give each stage to exactly one node")):
        spec.check_stages(3)


def test_check_stages_names_a_stage_hosted_by_no_node(tmp_path):
    spec = spec_with(tmp_path, [0], [1])
    with pytest.raises(SpeedError, match=re.escape(f"{tmp_path}/x.yaml: nodes: stage 2 is hosted by no node; "
                                                   "the bundle has stages 0-2")):
        spec.check_stages(3)
    with pytest.raises(SpeedError, match=re.escape("nodes: stages 2, 3 are hosted by no node; the bundle has stages 0-3")):
        spec.check_stages(4)


def test_check_stages_names_a_stage_that_does_not_exist(tmp_path):
    spec = spec_with(tmp_path, [5], [1], [2])
    with pytest.raises(SpeedError, match=re.escape(f"{tmp_path}/x.yaml: nodes[0].stages: stage 5 does not exist; "
                                                   "the bundle has stages 0-2")):
        spec.check_stages(3)
    with pytest.raises(SpeedError, match=re.escape("stage 1 does not exist; the bundle has only stage 0")):
        spec_with(tmp_path, [0, 1]).check_stages(1)


def test_node_and_owner_of_name_what_exists(tmp_path):
    spec = spec_with(tmp_path, [0], [1], [2])
    with pytest.raises(SpeedError, match=re.escape(f"{tmp_path}/x.yaml: no node named 'x'; "
                                                   "the nodes are edge-1, edge-2, edge-3")):
        spec.node("x")
    with pytest.raises(SpeedError, match=re.escape("nodes: stage 3 is hosted by no node")):
        spec.owner_of(3)


def test_a_metrics_port_may_not_take_another_process_address(tmp_path):
    path = cluster_with(tmp_path, set_node_key(1, "metrics_port", 50051))
    fails(path, f"{path}: nodes[1].metrics_port: 127.0.0.1:50051 is already used by edge-1; give every node, the "
                "coordinator and each metrics or link port its own address")


def test_a_link_port_is_read_and_may_not_take_another_process_address(tmp_path):
    assert load_cluster(cluster_with(tmp_path, set_node_key(1, "link_port", 50151))).nodes[1].link_port == 50151
    path = cluster_with(tmp_path, set_node_key(2, "link_port", 50052))
    fails(path, f"{path}: nodes[2].link_port: 127.0.0.1:50052 is already used by edge-2; give every node, the "
                "coordinator and each metrics or link port its own address")


def test_the_http_api_may_not_take_another_process_address(tmp_path):
    path = cluster_with(tmp_path, lambda data: data["coordinator"].update(http_address="127.0.0.1:50052"))
    fails(path, f"{path}: nodes[1].address: 127.0.0.1:50052 is already used by the coordinator's HTTP API")


def test_a_standby_node_hosts_no_stage_and_may_name_stages_to_take_over(tmp_path):
    def edit(data):
        data["nodes"].append({"name": "spare", "address": "127.0.0.1:50059", "stages": [], "standby_stages": [1, 2]})

    spec = load_cluster(cluster_with(tmp_path, edit))
    assert spec.node("spare").stages == () and spec.node("spare").standby_stages == (1, 2)
    spec.check_stages(3)


def test_a_standby_stage_that_does_not_exist_is_named(tmp_path):
    spec = load_cluster(cluster_with(tmp_path, set_node_key(0, "standby_stages", [7])))
    with pytest.raises(SpeedError, match=re.escape("nodes[0].standby_stages: stage 7 does not exist")):
        spec.check_stages(3)


# --- what a hostile or mistaken file costs: bounded, refused in one sentence --------------------------------


def test_a_file_over_one_mib_is_refused_before_parsing(tmp_path):
    import time

    path = tmp_path / "huge.yaml"
    path.write_bytes(yaml.safe_dump(MINIMAL).encode() + b"# padding\n" * 1_000_000)  # 10 MB
    started = time.monotonic()
    fails(path, f"cluster file {path} is larger than 256 KiB, the limit for a cluster file")
    assert time.monotonic() - started < 0.5


def test_a_file_just_under_the_limit_still_loads(tmp_path):
    from runtime.core.cluster_file import MAX_FILE_BYTES

    text = yaml.safe_dump(MINIMAL)
    path = write(tmp_path, text + "#" * (MAX_FILE_BYTES - len(text) - 1) + "\n")
    assert path.stat().st_size == MAX_FILE_BYTES
    assert load_cluster(path).name == "test"


@pytest.mark.parametrize("text, alias", [
    # a node's settings shared by anchor and merge key: innocent here, but <<: [*a, *a, ...] nested a few
    # levels deep expands to billions of entries
    ("cluster: t\ncoordinator: {address: '127.0.0.1:50050'}\nnodes:\n"
     "  - &first {name: a, address: '127.0.0.1:50051', stages: [0]}\n"
     "  - {<<: *first, name: b, address: '127.0.0.1:50052'}\n", "first"),
    ("cluster: t\ncoordinator: {address: '127.0.0.1:50050'}\nnodes:\n"
     "  - {name: a, address: '127.0.0.1:50051', stages: &s [0]}\n"
     "  - {name: b, address: '127.0.0.1:50052', stages: *s}\n", "s"),
])
def test_yaml_aliases_are_refused(tmp_path, text, alias):
    path = write(tmp_path, text)
    fails(path, f"{path}: line 5 uses the YAML alias *{alias}; a cluster file may not use anchors and aliases")


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    import time

    levels = [f"l0: &l0 [{', '.join(['x'] * 9)}]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9**10 values
    path = write(tmp_path, "\n".join(levels) + "\n")
    started = time.monotonic()
    fails(path, f"{path}: line 2 uses the YAML alias *l0")
    assert time.monotonic() - started < 0.5


def test_nesting_too_deep_for_the_parser_is_a_sentence(tmp_path):
    path = write(tmp_path, "cluster:\n" + "- " * 3000 + "1\n")  # block lists in block lists: Python's recursion limit
    fails(path, f"{path} nests lists or mappings too deeply to be a cluster file")


@pytest.mark.parametrize("text", ["cluster: " + "[" * 3000 + "\n", "cluster: " + "[{a: " * 10 + "\n"])
def test_brackets_nested_deeper_than_any_cluster_file_are_refused_at_once(tmp_path, text):
    import time

    path = write(tmp_path, text)
    started = time.monotonic()
    fails(path, f"{path}: line 1 nests [ ] and {{ }} more than 16 deep; a cluster file needs 3")
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("threads", [257, 10_000])
def test_node_threads_have_an_upper_bound(tmp_path, threads):
    path = cluster_with(tmp_path, set_node_key(1, "threads", threads))
    fails(path, f"{path}: nodes[1].threads: expected a whole number >= 0 and at most 256 (0 = one per core), "
                f"got {threads}")


def test_node_threads_from_zero_to_the_bound_load(tmp_path):
    def edit(data):
        data["nodes"][0]["threads"] = 0
        data["nodes"][1]["threads"] = 256

    assert [node.threads for node in load_cluster(cluster_with(tmp_path, edit)).nodes[:2]] == [0, 256]
