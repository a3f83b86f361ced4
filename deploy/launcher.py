"""`speed up` / `speed down`: a cluster file's coordinator and nodes as processes on this machine.

Each process writes its log under the cluster's state directory ($SPEED_STATE_DIR, default
~/.local/state/speed, then one folder per cluster file), next to the process ids `speed down` reads.
Children run in their own session, so Ctrl-C reaches only the launcher, which then stops them in
order: nodes first, the coordinator last; `speed down` stops a cluster started either way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import ClusterSpec, PlacementKind, listen_addresses, load_cluster, parse_address
from runtime.core.errors import SpeedError
from runtime.core.node_state import NodeState
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.cluster_secret import SECRET_FILE, load_secret, secret_path, write_secret
from runtime.wire.enums import node_state_of
from runtime.wire.security import open_channel, operator_credentials

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
PROCESSES_FILE = "processes.json"


class StopAsked(SpeedError):
    """`speed down` removed the record of a cluster that was still starting."""


def check_ports_free(spec: ClusterSpec) -> None:
    """Refuse to start when an address is taken, before any process is started."""
    for owner, address in listen_addresses(spec):
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: ignore closed connections
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise SpeedError(f"{address} ({owner}) is not free: {exc.strerror}; stop what listens there or "
                                 "change the address in the cluster file") from None


class LocalCluster:
    """The processes of one cluster file; a context manager that stops them all on exit."""

    def __init__(self, cluster_path: Path, *, emulated_link_ms: float | None = None, data_path: str | None = None,
                 record: bool = False, progress: Progress = NO_PROGRESS):
        """emulated_link_ms, data_path: override the file's; record: keep the process ids in the state
        directory from the first start on, for `speed down`; progress: the start of `with LocalCluster(...)`."""
        self.path = Path(cluster_path)
        self.spec = load_cluster(cluster_path)
        self.emulated_link_ms = emulated_link_ms
        self.data_path = data_path
        self.logs = self.spec.state_dir / "logs"
        self.record = self.spec.state_dir / PROCESSES_FILE if record else None
        self.processes: dict[str, subprocess.Popen] = {}  # "coordinator" and node names
        self.progress = progress

    @property
    def endpoint(self) -> str:
        return self.spec.coordinator.address

    def command(self, name: str) -> list[str]:
        base = [sys.executable, "-m", "runtime.cli"]
        if name == "coordinator":
            return [*base, "coordinator", "--cluster", str(self.spec.path),
                    *(["--data-path", self.data_path] if self.data_path else [])]
        command = [*base, "node", "--cluster", str(self.spec.path), "--name", name]
        if self.emulated_link_ms is not None:
            command += ["--emulate-link-ms", str(self.emulated_link_ms)]
        return command

    def log_of(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start_process(self, name: str) -> None:
        self.check_not_stopped()
        self.logs.mkdir(parents=True, exist_ok=True)
        with self.log_of(name).open("ab") as log:
            self.processes[name] = subprocess.Popen(
                self.command(name), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if self.record is not None:  # whole or not at all: `speed down` may read it at any moment
            scratch = self.record.with_name(f".{PROCESSES_FILE}.tmp")
            scratch.write_text(json.dumps({name: p.pid for name, p in self.processes.items()}))
            scratch.replace(self.record)

    def start(self, ready_timeout_s: float = READY_TIMEOUT_S, progress: Progress = NO_PROGRESS) -> None:
        """Start every process and wait until the coordinator reports SERVING (every node registered)."""
        bundle = load_bundle(self.spec.bundle)  # a bad bundle fails here, once, before any process starts
        self.spec.check_stages(bundle.config.n_stages)  # and so does a stage given to two nodes, or to none
        if self.spec.security is not None:
            operator_credentials(self.spec.security)  # and so do missing certificates
        check_ports_free(self.spec)
        if secret_path(self.spec) == self.spec.state_dir / SECRET_FILE:
            write_secret(secret_path(self.spec))  # a new one for each start; the file's or the certificates' stay
        else:
            load_secret(self.spec)  # a missing or unreadable one fails here, before any process starts
        try:
            self.start_process("coordinator")
            for node in self.spec.nodes:
                self.start_process(node.name)
            self.wait_ready(ready_timeout_s, progress)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, progress: Progress = NO_PROGRESS) -> None:
        """Until every node of the file has registered and runs its own stages, or under placement: auto the
        stages chosen for it (not just until the cluster can serve, which one node of a weight-shared bundle
        already can)."""
        deadline = time.monotonic() + timeout_s
        counted = 0  # nodes reported as registered so far
        with self.channel() as channel, progress.task("nodes registered", total=len(self.spec.nodes)):
            coordinator = pb_grpc.CoordinatorStub(channel)
            while True:
                self.check_not_stopped()
                self.check_alive()
                try:
                    status = coordinator.ClusterStatus(pb.ClusterStatusRequest(), timeout=1.0)
                    auto = status.placement == str(PlacementKind.AUTO)
                    ready = sum(node_state_of(node) == NodeState.SERVING
                                and (auto or tuple(node.hosting) == tuple(node.stages)) for node in status.nodes)
                    progress.advance(ready - counted)
                    counted = ready
                    if ready == len(status.nodes) and status.placement_settled:
                        return
                except grpc.RpcError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise SpeedError(f"cluster {self.spec.name} was not serving after {timeout_s:g} s; "
                                     f"see the logs in {self.logs}")
                time.sleep(0.2)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """In a secure cluster, the client identity `speed certs init` made; None in a plain one."""
        return operator_credentials(self.spec.security) if self.spec.security is not None else None

    def channel(self) -> grpc.Channel:
        return open_channel(self.endpoint, self.credentials())

    def check_not_stopped(self) -> None:
        """Raise StopAsked once `speed down` has removed the record of processes started here."""
        if self.record is not None and self.processes and not self.record.exists():
            raise StopAsked(f"cluster {self.spec.name} was stopped by `speed down`")

    def check_alive(self) -> None:
        """SpeedError when a process failed; a node that stopped on purpose (status 0: drained, or stopped
        by a signal) is let go."""
        for name, process in list(self.processes.items()):
            if process.poll() is None:
                continue
            self.check_not_stopped()  # `speed down` stopped it
            if process.returncode == 0 and name != "coordinator":
                self.processes.pop(name)
                self.progress.note(f"node {name} stopped on purpose: {self.last_line(name)}")
                continue
            raise SpeedError(f"{name} exited (status {process.returncode}): {self.last_line(name)}")

    def last_line(self, name: str) -> str:
        lines = self.log_of(name).read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"no output; see {self.log_of(name)}"

    def stop_process(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            stop_pids([process.pid])
            process.wait()

    def stop(self) -> None:
        """Nodes first, so the coordinator does not report their departure as failures of live requests."""
        names = [n for n in self.processes if n != "coordinator"]
        stop_pids([self.processes[n].pid for n in names])
        for name in [*names, "coordinator"]:
            self.stop_process(name)

    def __enter__(self) -> LocalCluster:
        self.progress.note(f"starting cluster {self.spec.name}: {len(self.spec.nodes)} node(s) load the bundle and warm "
                           "up (the first start on a machine also pre-packs every graph, which takes longer)")
        self.start(progress=self.progress)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_pids(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after STOP_TIMEOUT_S."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished:
            return False
    except ChildProcessError:
        pass  # not our child (a detached cluster): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _exited(pid)


def _exited(pid: int) -> bool:
    """Whether `pid` has exited and waits to be collected by its parent. A detached cluster's processes are
    the children of the system's first process, which may collect them seconds later, or in a container
    never; until then signal 0 still finds them."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False  # no /proc here: signal 0 is all there is
    return stat.rpartition(")")[2].split()[0] == "Z"  # after the command's name, which may hold anything


def up(cluster_path: Path, *, detach: bool, emulated_link_ms: float | None = None, data_path: str | None = None,
       progress: Progress = NO_PROGRESS) -> None:
    """progress: the wait for the nodes to register."""
    cluster = LocalCluster(cluster_path, emulated_link_ms=emulated_link_ms, data_path=data_path, record=True,
                           progress=progress)
    record = cluster.record
    if record.exists() and any(_alive(pid) for pid in json.loads(record.read_text()).values()):
        raise SpeedError(f"cluster {cluster.spec.name} is already up; stop it with `speed down {cluster_path}`")
    try:
        cluster.start(progress=progress)  # records each process as it starts
    except StopAsked:
        print(f"cluster {cluster.spec.name} stopped while it was starting")
        return
    except BaseException:
        record.unlink(missing_ok=True)
        raise
    print(f"cluster {cluster.spec.name} is serving: coordinator at {cluster.endpoint} "
          f"({len(cluster.spec.nodes)} nodes); logs in {cluster.logs}")
    security = cluster.spec.security
    if security is not None:
        proof = (f"--cert {security.certs / 'client.pem'} --key {security.certs / 'client.key'}"
                 if security.client_auth == "certificate" else f"--token \"$(cat {security.certs / 'client.token'})\"")
        print(f"clients connect with TLS: speed generate --coordinator {cluster.endpoint} --ca {security.certs / 'ca.pem'} "
              f"{proof} PROMPT")
    if detach:
        print(f"stop it with: speed down {cluster_path}")
        return
    stopping = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.append(True))
    print("press Ctrl-C to stop it", flush=True)
    try:
        while not stopping and record.exists():  # `speed down` removes the record before it stops anything
            try:
                cluster.check_alive()
            except SpeedError:
                if record.exists():
                    raise
            time.sleep(0.2)
    finally:
        cluster.stop()
        record.unlink(missing_ok=True)
    print(f"cluster {cluster.spec.name} stopped")


def down(cluster_path: Path) -> None:
    spec = load_cluster(cluster_path)
    record = spec.state_dir / PROCESSES_FILE
    if not record.exists():
        print(f"cluster {spec.name} is not up (no processes recorded in {record.parent})")
        return
    pids = json.loads(record.read_text())
    record.unlink(missing_ok=True)  # first: a launcher in the foreground then knows the stop is wanted
    nodes = [pid for name, pid in pids.items() if name != "coordinator"]
    stop_pids(nodes)
    stop_pids([pid for name, pid in pids.items() if name == "coordinator"])
    print(f"cluster {spec.name} stopped")
