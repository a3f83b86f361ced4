"""`speed status`: the coordinator's ClusterStatus as a line for the cluster above a table of its nodes;
once (plain text when piped), as one JSON object, or refreshed on a terminal until Ctrl-C (--watch)."""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext

from google.protobuf.json_format import MessageToDict
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from runtime.client import Client, DeadlineExceeded, Unavailable
from runtime.core.node_state import NodeState
from runtime.wire import speed_pb2 as pb
from runtime.wire.enums import node_state_of

PIPE_WIDTH = 160  # characters a line may take when stdout is not a terminal (a file, a pipe)
WATCH_TIMEOUT_S = 3.0  # how long --watch waits for one answer before it says the coordinator is unreachable
STATE_STYLES = {NodeState.SERVING: "green", NodeState.DOWN: "bold red", NodeState.WAITING: "yellow", NodeState.LEFT: "dim"}
COLUMNS = ("node", "address", "state", "stages", "sequences", "step ms", "tokens/s", "pass ms", "cores", "free MB",
           "heartbeat", "provider")


def console_for_stdout() -> Console:
    """A terminal gets colours and its own width; anything else plain text, no ANSI codes, PIPE_WIDTH wide."""
    terminal = sys.stdout.isatty()
    return Console(force_terminal=terminal, width=None if terminal else PIPE_WIDTH, markup=False, highlight=False)


def status_json(status: pb.ClusterStatusReply) -> str:
    """The whole reply as one line of JSON, with the .proto's field names, every field present, and a node's
    state in the words the table shows."""
    reply = MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for node, fields in zip(status.nodes, reply.get("nodes", [])):
        fields["state"] = str(node_state_of(node))
    return json.dumps(reply)


def cluster_line(status: pb.ClusterStatusReply) -> str:
    return (f"cluster {status.cluster}: {'serving' if status.serving else 'NOT serving'}, "
            f"{status.active_requests} active request(s), {status.queued_requests} queued (at most {status.max_queue}), "
            f"bundle {status.bundle_sha256[:12]}")


def _stages(node: pb.NodeStatus) -> str:
    """Its own stages, and the ones it runs now where they differ (after a failover, or none while down)."""
    own, now = list(node.stages), list(node.hosting)
    text = ",".join(map(str, own)) or "standby"
    return text if now == own else f"{text} (now {','.join(map(str, now)) or 'none'})"


def _own_pass_ms(node: pb.NodeStatus) -> str:
    """What one token costs it, as it measured itself at start: a pass of each of its own stages for one row
    (the JSON has every stage it holds at every row count, and the classifier's time)."""
    own = [p.ms for p in node.pass_times if p.rows == 1 and p.stage in node.stages]
    return f"{sum(own):.2f}" if own else "-"


def node_row(node: pb.NodeStatus) -> list[Text | str]:
    """cores: how many cores one of its passes keeps busy, of those its machine lets it run on."""
    state = node_state_of(node)
    serving = state == NodeState.SERVING
    return [
        node.name, node.address, Text(state, style=STATE_STYLES.get(state, "")), _stages(node),
        f"{node.sequences}/{node.max_sequences}",
        f"{node.step_ms:.1f}" if serving and node.step_ms > 0 else "-",
        f"{node.positions_per_s:.1f}" if serving else "-",
        _own_pass_ms(node),
        f"{node.cores_used:g}/{node.machine.cores:g}" if node.machine.cores else "-",
        f"{node.memory_available_bytes / 2**20:.0f}" if node.memory_available_bytes else "-",
        f"{node.last_heartbeat_s:.1f} s ago" if node.last_heartbeat_s >= 0 else "never",
        node.provider.removesuffix("ExecutionProvider") or "-",  # CPU, CUDA: the JSON has the whole name
    ]


def node_table(status: pb.ClusterStatusReply) -> Table:
    """A row per node; on a narrow terminal the cells after its name, address and state wrap."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, header_style="bold")
    for column in COLUMNS:
        numeric = column in ("sequences", "step ms", "tokens/s", "pass ms", "cores", "free MB", "heartbeat")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column in ("node", "address", "state"))
    for node in status.nodes:
        table.add_row(*node_row(node))
    return table


def status_view(status: pb.ClusterStatusReply | None, *, trouble: str = "", at: str = "") -> Group:
    """The cluster's line (with the time of the answer, when given), the node table, and above them
    what went wrong since that answer, if anything."""
    parts = [Text(trouble, style="bold red")] if trouble else []
    if status is not None:
        parts += [Text(cluster_line(status) + (f" (at {at})" if at else "")), node_table(status)]
    return Group(*parts)


def show_status(address: str, credentials: dict, *, as_json: bool = False) -> None:
    with Client(address, **credentials) as client:
        status = client.status()
    if as_json:
        print(status_json(status))
    else:
        console_for_stdout().print(status_view(status))


def watch_status(address: str, credentials: dict, *, interval_s: float) -> None:
    """Ask every interval_s until Ctrl-C, which ends it quietly. On a terminal the view is redrawn in
    place; piped, each answer is printed below the last. A coordinator that does not answer is one line
    (above the last answer, on a terminal) until it answers again."""
    console = console_for_stdout()
    live = Live(console=console, auto_refresh=False) if console.is_interactive else None
    last, at, trouble = None, "", ""

    def show() -> None:
        if live is not None:
            live.update(status_view(last, trouble=trouble, at=at), refresh=True)
        else:
            console.print(status_view(None if trouble else last, trouble=trouble, at=at))
            console.print()

    ask = _Asker(address, credentials, timeout_s=max(WATCH_TIMEOUT_S, interval_s))
    try:
        with live if live is not None else nullcontext(), ask:
            while True:
                status, failure = ask()
                if status is not None:
                    last, at, trouble = status, _clock(), ""
                    show()
                elif not trouble:  # the first failure; the next ones change nothing on screen
                    trouble = (f"cannot reach the coordinator {address} since {_clock()} ({failure}); "
                               f"retrying every {interval_s:g} s")
                    show()
                time.sleep(interval_s)
    except KeyboardInterrupt:
        pass


class _Asker:
    """ClusterStatus calls that give (reply, "") or (None, the gRPC code) where the coordinator cannot be
    reached or does not answer in time. A fresh channel follows each failure, so a restarted coordinator
    is seen at the next call rather than after gRPC's reconnection backoff (which grows to minutes)."""

    def __init__(self, address: str, credentials: dict, *, timeout_s: float):
        self.address, self.credentials, self.timeout_s = address, credentials, timeout_s
        self.client: Client | None = None

    def __call__(self) -> tuple[pb.ClusterStatusReply | None, str]:
        self.client = self.client or Client(self.address, **self.credentials)
        try:
            return self.client.status(timeout_s=self.timeout_s), ""
        except (Unavailable, DeadlineExceeded) as exc:
            self.client.close()
            self.client = None
            return None, exc.code.name

    def __enter__(self) -> _Asker:
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()


def _clock() -> str:
    return time.strftime("%H:%M:%S")
