"""The cluster file: which machines run the coordinator and which stages, as typed, validated specs.

A cluster file is YAML (see deploy/local.yaml):

    cluster: local-demo              # required: a name for the cluster
    bundle: null                     # a bundle directory, relative to this file; null or absent = the shipped demo
    coordinator:
      address: 127.0.0.1:50050       # required host:port; quote IPv6 hosts: "[::1]:50050"
      step_timeout_s: 3.0            # > 0: how long a node may take to answer one step message
      heartbeat_interval_s: 1.0      # > 0
      max_queue: 64                  # >= 0: requests that may wait for a free sequence slot; more are refused
      metrics_port: 9150             # optional: serve Prometheus metrics over HTTP on this port of the address's host
      http_address: 127.0.0.1:8000   # optional: serve the OpenAI-compatible HTTP API here (off when absent)
    data_path: ring                  # ring (default): nodes hand hidden states to the next node and stage 0 runs
                                     # ahead; lockstep: every tick is a round trip through the coordinator
    placement: file                  # file (default): each node runs the stages listed below; auto: the
                                     # coordinator chooses from the nodes' measured speed, whenever nodes join
                                     # or leave, among the stages each can host (stages and standby)
    speculation:                     # optional
      enabled: true                  # false = sequential decoding
      prefill_chunk: 64              # >= 1
      window: 8                      # 0 to 64, the ring data path: positions stage 0 runs ahead of the
                                     # committed ones on its own guesses
      guess_threshold: 0.5           # 0 to 1: a guess enters the pipeline only at this probability (0 = always,
                                     # 1 = early stages make no guesses and skip the classifier);
                                     # absent = the bundle's own thresholds (`speed calibrate`), if it has them
    nodes:                           # required, one entry per node process
      - name: edge-1                 # required: letters, digits, '-', '_', '.'; unique
        address: 127.0.0.1:50051     # required host:port, unique across the nodes and the coordinator
        stages: [0]                  # required: the stages this node hosts; [] = a standby node
        standby_stages: [1]          # stages it can take over from a lost node (a weight-shared bundle: any)
        device: cpu                  # cpu or cuda
        cpu_fallback: false          # a cuda node may fall back to CPU when CUDA is not really available
        threads: 1                   # 0 to 256, 0 = one per core
        max_sequences: 8             # >= 1
        idle_timeout_s: 300          # > 0: free a sequence's caches after this long without a step
        emulated_link_ms: 0          # >= 0, EMULATION for benchmarks only: one-way latency added per step message
        emulated_cpu_share: 0.33     # optional, > 0, EMULATION for benchmarks only: the node process may use this
                                     # share of one core (a CPU quota through cgroups), a slower device
        metrics_port: 9151           # optional: serve Prometheus metrics over HTTP on this port of the address's host
        link_port: 50151             # optional: take the other nodes' direct links (ring hops) on this port of the
                                     # address's host; absent: any free port (the node tells the coordinator)
    security:                        # optional: mutual TLS between the processes, TLS and authentication for clients
      certs: certs/local             # a directory written by `speed certs init DIR --cluster FILE`, relative to this file
      client_auth: token             # token (bearer tokens, `speed tokens add`) or certificate (client certificates)
    insecure: false                  # true: allow listening on an address other than loopback without security
    secret_file: cluster.secret      # optional: the secret the cluster's processes prove themselves with, relative
                                     # to this file (`speed certs secret FILE`); absent = made on this machine

Every mistake raises SpeedError with one sentence naming the file, the key path and what is expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from runtime.core.errors import SpeedError
from runtime.core.generation import MAX_WINDOW
from runtime.core.grouping import PREFILL_CHUNK
from runtime.core.text_enum import TextEnum


class PlacementKind(TextEnum):
    """Who chooses which node runs which stage."""

    FILE = "file"  # each node's stages as the file lists them; a lost node's move to nodes that can run them
    AUTO = "auto"  # the coordinator, from what the serving nodes measured, whenever they change


class DataPathKind(TextEnum):
    """How the work of a token travels between the nodes."""

    LOCKSTEP = "lockstep"  # every tick a round trip through the coordinator
    RING = "ring"  # node to node; stage 0 runs ahead on its guesses


DEVICES = ("cpu", "cuda")
DATA_PATHS = tuple(kind.value for kind in DataPathKind)
PLACEMENTS = tuple(kind.value for kind in PlacementKind)
NODE_NAME = re.compile(r"[A-Za-z0-9._-]+")
ADDRESS_HINT = "host:port, e.g. 127.0.0.1:50051"
MAX_THREADS = 256  # intra-op threads of a node (and of `speed reference`, `bench`, `train`); more only slow it down
MAX_FILE_BYTES = 256 << 10  # a cluster file of 1024 nodes is about 100 KiB; PyYAML parses 256 KiB in seconds at worst


@dataclass(frozen=True)
class CoordinatorSpec:
    address: str
    step_timeout_s: float = 3.0
    heartbeat_interval_s: float = 1.0
    max_queue: int = 64  # requests waiting for a sequence slot; more get RESOURCE_EXHAUSTED
    metrics_port: int | None = None  # Prometheus metrics over HTTP; None = off
    http_address: str | None = None  # the OpenAI-compatible HTTP API; None = off


@dataclass(frozen=True)
class SpeculationSpec:
    enabled: bool = True
    prefill_chunk: int = PREFILL_CHUNK
    guess_threshold: float | None = None  # the confidence gate for every stage; None = the bundle's thresholds
    window: int = 8  # the ring data path: positions stage 0 runs ahead of the committed ones


@dataclass(frozen=True)
class NodeSpec:
    name: str
    address: str
    stages: tuple[int, ...]
    device: str = "cpu"
    cpu_fallback: bool = False
    threads: int = 1  # 0 = one per core
    max_sequences: int = 8
    idle_timeout_s: float = 300.0
    emulated_link_ms: float = 0.0  # emulation for benchmarks only
    emulated_cpu_share: float | None = None  # emulation for benchmarks only: a CPU quota of this share of one core
    standby_stages: tuple[int, ...] = ()  # stages whose graphs it also loads, to take them over
    metrics_port: int | None = None  # Prometheus metrics over HTTP; None = off
    link_port: int | None = None  # where other nodes' direct links (ring hops) come in; None = any free port


CLIENT_AUTH = ("token", "certificate")


@dataclass(frozen=True)
class SecuritySpec:
    certs: Path  # resolved; the files of `speed certs init` (deploy/certs.py)
    client_auth: str = "token"  # how clients prove who they are: "token" or "certificate"


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    path: Path  # the cluster file, resolved
    bundle: Path | None  # resolved; None = the shipped demo bundle
    coordinator: CoordinatorSpec
    speculation: SpeculationSpec
    nodes: tuple[NodeSpec, ...]
    data_path: DataPathKind = DataPathKind.RING
    placement: PlacementKind = PlacementKind.FILE
    source: str = dataclasses.field(default="", compare=False)  # the file as the user named it, for messages
    security: SecuritySpec | None = None  # None: plain connections (loopback only unless insecure)
    insecure: bool = False  # plain connections allowed on other addresses than loopback
    secret_file: Path | None = None  # resolved; None: the certificates directory's, else the state directory's

    @property
    def state_dir(self) -> Path:
        """Where this machine keeps the cluster's state: logs, process ids, its secret ($SPEED_STATE_DIR)."""
        root = Path(os.environ.get("SPEED_STATE_DIR") or Path.home() / ".local" / "state" / "speed")
        return root / f"{self.name}-{hashlib.sha1(str(self.path).encode()).hexdigest()[:8]}"

    @property
    def _file_name(self) -> str:
        return self.source or str(self.path)

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(node.name for node in self.nodes)
        raise SpeedError(f"{self._file_name}: no node named {name!r}; the nodes are {names}")

    def owner_of(self, stage: int) -> NodeSpec:
        for node in self.nodes:
            if stage in node.stages:
                return node
        raise SpeedError(f"{self._file_name}: nodes: stage {stage} is hosted by no node")

    def check_stages(self, n_stages: int) -> None:
        """Every stage 0..n_stages-1 must be hosted by exactly one node; standby stages must exist."""
        existing = f"the bundle has stages 0-{n_stages - 1}" if n_stages > 1 else "the bundle has only stage 0"
        owners: dict[int, str] = {}
        for i, node in enumerate(self.nodes):
            for key, stages in (("stages", node.stages), ("standby_stages", node.standby_stages)):
                for stage in stages:
                    if stage >= n_stages:
                        raise SpeedError(f"{self._file_name}: nodes[{i}].{key}: stage {stage} does not exist; {existing}")
            for stage in node.stages:
                if stage in owners:
                    raise SpeedError(f"{self._file_name}: nodes[{i}].stages: stage {stage} is already hosted by "
                                     f"{owners[stage]}; give each stage to exactly one node")
                owners[stage] = node.name
        orphans = [str(stage) for stage in range(n_stages) if stage not in owners]
        if orphans:
            which = f"stage {orphans[0]} is" if len(orphans) == 1 else f"stages {', '.join(orphans)} are"
            raise SpeedError(f"{self._file_name}: nodes: {which} hosted by no node; {existing}")

    def with_emulated_link_ms(self, ms: float) -> ClusterSpec:
        """The same cluster with every node's emulated one-way link latency set to `ms` (benchmarks only)."""
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not (math.isfinite(ms) and ms >= 0):
            raise SpeedError(f"emulated link latency must be a number of milliseconds >= 0, got {ms!r}")
        nodes = tuple(dataclasses.replace(node, emulated_link_ms=float(ms)) for node in self.nodes)
        return dataclasses.replace(self, nodes=nodes)


def on_host_of(address: str, port: int) -> str:
    """Another port on the host of address: ("[::1]:50051", 50151) -> "[::1]:50151"."""
    host, _ = parse_address(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """Split host:port: "127.0.0.1:50051" -> ("127.0.0.1", 50051); "[::1]:50051" -> ("::1", 50051)."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} is not host:port; write e.g. 127.0.0.1:50051 or [::1]:50051")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r} has {host!r} in brackets, which is not an IPv6 address") from None
    elif any(c in host for c in ":[]"):
        raise ValueError(f"{text!r} is not host:port; write an IPv6 host in brackets, e.g. [::1]:50051")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{text!r} has port {port!r}; a port is a whole number from 1 to 65535")
    return host, int(port)


class _Refused(Exception):
    """What the loader refuses to read, as a sentence without the file's name."""


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without aliases (*name): a few lines of them, merged with <<, can expand to billions of values;
    and without [ ] { } nested deeper than a cluster file needs: PyYAML's time per token grows with the depth."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"line {event.start_mark.line + 1} uses the YAML alias *{event.anchor}; a cluster file "
                           "may not use anchors and aliases, write each value out")
        return super().compose_node(parent, index)

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= 16:
            raise _Refused(f"line {self.line + 1} nests [ ] and {{ }} more than 16 deep; a cluster file needs 3")
        super().fetch_flow_collection_start(TokenClass)


def load_cluster(path: str | Path) -> ClusterSpec:
    shown = str(path)
    path = Path(path)
    if not path.exists():
        raise SpeedError(f"cluster file {shown} does not exist")
    if not path.is_file():
        raise SpeedError(f"cluster file {shown} is not a file")
    with path.open("rb") as f:
        text = f.read(MAX_FILE_BYTES + 1)  # never more: the file may be huge, or growing
    if len(text) > MAX_FILE_BYTES:
        raise SpeedError(f"cluster file {shown} is larger than {MAX_FILE_BYTES >> 10} KiB, the limit for a cluster file; "
                         "check that you named the right file")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader
    except _Refused as exc:
        raise SpeedError(f"{shown}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpeedError(f"{shown} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise SpeedError(f"{shown} nests lists or mappings too deeply to be a cluster file (it needs three levels); "
                         "check that you named the right file") from None
    top = _Key(shown)
    if not isinstance(data, dict):
        raise top.error(f"expected a mapping with cluster, coordinator and nodes at the top level, got {_shown(data)}")
    base = path.resolve().parent
    fields = _fields(data, top, {
        "cluster": _string,
        "bundle": partial(_bundle, base=base),
        "coordinator": _coordinator,
        "speculation": _speculation,
        "data_path": lambda value, key: DataPathKind(_string(value, key, choices=DATA_PATHS)),
        "placement": lambda value, key: PlacementKind(_string(value, key, choices=PLACEMENTS)),
        "nodes": _nodes,
        "security": partial(_security, base=base),
        "insecure": _flag,
        "secret_file": lambda value, key: (base / Path(_string(value, key)).expanduser()).resolve(),
    }, required={
        "cluster": "a name for this cluster, e.g. local-demo",
        "coordinator": "a mapping with the coordinator's address: host:port, e.g. 127.0.0.1:50050",
        "nodes": "a list of nodes, each with name, address and stages",
    })
    _check_addresses_unique(fields["coordinator"], fields["nodes"], top)
    data_path = fields.get("data_path", DataPathKind.RING)
    return ClusterSpec(name=fields["cluster"], path=path.resolve(), bundle=fields.get("bundle"),
                       coordinator=fields["coordinator"], speculation=fields.get("speculation", SpeculationSpec()),
                       nodes=fields["nodes"], data_path=data_path, placement=fields.get("placement", PlacementKind.FILE),
                       source=shown,
                       security=fields.get("security"),
                       insecure=fields.get("insecure", False), secret_file=fields.get("secret_file"))


# --- key paths and errors ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    """Where a value sits: the file and a key path such as nodes[1].threads."""

    file: str
    path: str = ""

    def child(self, name: str) -> _Key:
        return _Key(self.file, f"{self.path}.{name}" if self.path else name)

    def item(self, index: int) -> _Key:
        return _Key(self.file, f"{self.path}[{index}]")

    def error(self, problem: str) -> SpeedError:
        return SpeedError(f"{self.file}: {self.path}: {problem}" if self.path else f"{self.file}: {problem}")


def _shown(value: Any) -> str:
    """A value as the user wrote it in YAML, for 'got ...'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)) and value:  # a whole section would drown the sentence
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return " ".join(problem.split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


# --- one checker per kind of value: each takes (value, key) and returns the typed value ----------------

Check = Callable[[Any, _Key], Any]


def _fields(value: Any, key: _Key, checks: dict[str, Check], required: dict[str, str]) -> dict[str, Any]:
    """A mapping whose keys are all known and whose required keys are present, each value checked."""
    if not isinstance(value, dict):
        raise key.error(f"expected a mapping of settings, got {_shown(value)}")
    for name in value:
        if name not in checks:
            close = difflib.get_close_matches(str(name), checks, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise key.error(f"unknown key {name!r}; expected one of {', '.join(sorted(checks))}{hint}")
    for name, what in required.items():
        if name not in value:
            raise key.error(f"missing {name!r} ({what})")
    return {name: checks[name](item, key.child(name)) for name, item in value.items()}


def _string(value: Any, key: _Key, *, choices: tuple[str, ...] = ()) -> str:
    if choices and value not in choices:
        raise key.error(f"expected one of {', '.join(choices)}, got {_shown(value)}")
    if not isinstance(value, str) or not value.strip():
        raise key.error(f"expected a non-empty string, got {_shown(value)}")
    return value


def _whole(value: Any, key: _Key, *, minimum: int, maximum: int | None = None, zero: str = "") -> int:
    # bool is an int in Python, and YAML reads yes/no/on/off as bools: never a count
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise key.error(f"expected a whole number >= {minimum}, got {_shown(value)}")
    if maximum is not None and value > maximum:
        meaning = f" ({zero})" if zero else ""
        raise key.error(f"expected a whole number >= {minimum} and at most {maximum}{meaning}, got {value}")
    return value


def _number(value: Any, key: _Key, *, minimum: float, inclusive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < minimum or (value == minimum and not inclusive):
        raise key.error(f"expected a number {'>=' if inclusive else '>'} {minimum:g}, got {_shown(value)}")
    return float(value)


def _probability(value: Any, key: _Key) -> float:
    number = _number(value, key, minimum=0, inclusive=True)
    if number > 1:
        raise key.error(f"expected a probability from 0 to 1, got {_shown(value)}")
    return number


def _flag(value: Any, key: _Key) -> bool:
    if not isinstance(value, bool):
        raise key.error(f"expected true or false, got {_shown(value)}")
    return value


def _whole_list(value: Any, key: _Key, *, minimum: int, empty_ok: bool = False) -> tuple[int, ...]:
    if not isinstance(value, list) or not (value or empty_ok):
        kind = "list" if empty_ok else "non-empty list"
        raise key.error(f"expected a {kind} of whole numbers >= {minimum}, e.g. [{minimum}], got {_shown(value)}")
    items = tuple(_whole(item, key.item(i), minimum=minimum) for i, item in enumerate(value))
    seen: set[int] = set()
    for item in items:  # a set, not items[:i]: a long list must not take quadratic time
        if item in seen:
            raise key.error(f"{item} is listed twice; list each once")
        seen.add(item)
    return items


_positive = partial(_number, minimum=0, inclusive=False)


def _port(value: Any, key: _Key) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise key.error(f"expected a port, a whole number from 1 to 65535 (or null for none), got {_shown(value)}")
    return value


def _address(value: Any, key: _Key) -> str:
    if not isinstance(value, str):
        raise key.error(f"expected {ADDRESS_HINT}, got {_shown(value)}")
    try:
        parse_address(value)
    except ValueError as exc:
        raise key.error(str(exc)) from None
    return value


# --- the sections -----------------------------------------------------------------------------------


def _bundle(value: Any, key: _Key, *, base: Path) -> Path | None:
    if value is None:
        return None
    directory = (base / Path(_string(value, key)).expanduser()).resolve()
    if not directory.is_dir():
        problem = "does not exist" if not directory.exists() else "is not a directory"
        raise key.error(f"{directory} {problem}; give a bundle directory written by `speed export`, relative to this file")
    return directory


def _coordinator(value: Any, key: _Key) -> CoordinatorSpec:
    return CoordinatorSpec(**_fields(value, key, {
        "address": _address,
        "step_timeout_s": _positive,
        "heartbeat_interval_s": _positive,
        "max_queue": partial(_whole, minimum=0),
        "metrics_port": _port,
        "http_address": _address,
    }, required={"address": "host:port, e.g. 127.0.0.1:50050"}))


def _security(value: Any, key: _Key, *, base: Path) -> SecuritySpec:
    fields = _fields(value, key, {
        "certs": _string,
        "client_auth": partial(_string, choices=CLIENT_AUTH),
    }, required={"certs": "the directory written by `speed certs init DIR --cluster FILE`, relative to this file"})
    return SecuritySpec(certs=(base / Path(fields["certs"]).expanduser()).resolve(),
                        client_auth=fields.get("client_auth", "token"))


def _speculation(value: Any, key: _Key) -> SpeculationSpec:
    return SpeculationSpec(**_fields(value, key, {
        "enabled": _flag,
        "prefill_chunk": partial(_whole, minimum=1),
        "guess_threshold": _probability,
        "window": partial(_whole, minimum=0, maximum=MAX_WINDOW, zero="more only multiplies the work a flip throws away"),
    }, required={}))


def _node_name(value: Any, key: _Key) -> str:
    name = _string(value, key)
    if not NODE_NAME.fullmatch(name):
        raise key.error(f"{name!r} may use only letters, digits, '-', '_' and '.'")
    return name


NODE_CHECKS: dict[str, Check] = {
    "name": _node_name,
    "address": _address,
    "stages": partial(_whole_list, minimum=0, empty_ok=True),
    "standby_stages": partial(_whole_list, minimum=0, empty_ok=True),
    "device": partial(_string, choices=DEVICES),
    "cpu_fallback": _flag,
    "threads": partial(_whole, minimum=0, maximum=MAX_THREADS, zero="0 = one per core"),
    "max_sequences": partial(_whole, minimum=1),
    "idle_timeout_s": _positive,
    "emulated_link_ms": partial(_number, minimum=0, inclusive=True),
    "emulated_cpu_share": partial(_number, minimum=0, inclusive=False),
    "metrics_port": _port,
    "link_port": _port,
}
NODE_REQUIRED = {
    "name": "letters, digits, '-', '_' or '.', e.g. edge-1",
    "address": ADDRESS_HINT,
    "stages": "a list of the stages this node hosts, e.g. [0], or [] for a standby node",
}


def _nodes(value: Any, key: _Key) -> tuple[NodeSpec, ...]:
    if not isinstance(value, list) or not value:
        raise key.error(f"expected a non-empty list of nodes, each with name, address and stages, got {_shown(value)}")
    nodes = tuple(NodeSpec(**_fields(item, key.item(i), NODE_CHECKS, NODE_REQUIRED)) for i, item in enumerate(value))
    seen: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.name in seen:
            raise key.item(i).child("name").error(f"{node.name} is already the name of nodes[{seen[node.name]}]; "
                                                  "give every node its own name")
        seen[node.name] = i
    return nodes


def same_address(a: str, b: str) -> bool:
    """Whether two host:port texts name the same endpoint; False when either is not host:port."""
    try:
        return _endpoint(a) == _endpoint(b)
    except ValueError:
        return False


def _endpoint(address: str) -> tuple[str, int]:
    """host:port compared by meaning where the host is an IP address ([::1] = [0:0::1]), else by spelling."""
    host, port = parse_address(address)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return host.lower(), port


def listen_addresses(spec: ClusterSpec) -> list[tuple[str, str]]:
    """(owner, host:port) of every port the cluster's processes listen on, metrics included."""
    return [(owner, address) for owner, address, _ in _listeners(spec.coordinator, spec.nodes)]


def listening_ports(spec: ClusterSpec) -> set[int]:
    """Every port the file has a process of the cluster listen on, whatever the host: a port a node takes for its
    links when none is named must not be one of them, or the process it belongs to could not start."""
    return {parse_address(address)[1] for _, address, _ in _listeners(spec.coordinator, spec.nodes)}


def _listeners(coordinator: CoordinatorSpec, nodes: tuple[NodeSpec, ...]) -> list[tuple[str, str, str]]:
    """(owner, host:port, key path) of every listening port."""
    found = [("the coordinator", coordinator.address, "coordinator.address")]
    if coordinator.metrics_port is not None:
        found.append(("the coordinator's metrics", on_host_of(coordinator.address, coordinator.metrics_port),
                      "coordinator.metrics_port"))
    if coordinator.http_address is not None:
        found.append(("the coordinator's HTTP API", coordinator.http_address, "coordinator.http_address"))
    for i, node in enumerate(nodes):
        found.append((node.name, node.address, f"nodes[{i}].address"))
        if node.metrics_port is not None:
            found.append((f"{node.name}'s metrics", on_host_of(node.address, node.metrics_port),
                          f"nodes[{i}].metrics_port"))
        if node.link_port is not None:
            found.append((f"{node.name}'s links", on_host_of(node.address, node.link_port), f"nodes[{i}].link_port"))
    return found


def _check_addresses_unique(coordinator: CoordinatorSpec, nodes: tuple[NodeSpec, ...], top: _Key) -> None:
    users: dict[tuple[str, int], str] = {}
    for owner, address, path in _listeners(coordinator, nodes):
        endpoint = _endpoint(address)
        if endpoint in users:
            key = _Key(top.file, path)
            raise key.error(f"{address} is already used by {users[endpoint]}; give every node, the coordinator "
                            "and each metrics or link port its own address")
        users[endpoint] = owner
