"""Commands that run and watch a cluster: up, down, status, and one coordinator or node process."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.cli.arguments import add_credential_flags, configure_logging, credentials_of, link_ms
from runtime.core.cluster_file import DATA_PATHS


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("up", help="start a cluster file's coordinator and nodes on this machine")
    p.add_argument("cluster_file", type=Path, metavar="FILE", help="cluster file, e.g. deploy/local.yaml")
    p.add_argument("--detach", action="store_true", help="leave it running in the background; stop with speed down")
    p.add_argument("--emulate-link-ms", type=link_ms, metavar="MS",
                   help="EMULATED one-way latency of every node's link, 0 to 60000, for benchmarks (overrides the file)")
    p.add_argument("--data-path", choices=DATA_PATHS, help="how the work travels (overrides the file's data_path)")
    p.set_defaults(run=cmd_up)

    p = commands.add_parser("down", help="stop a cluster started with speed up, detached or in the foreground")
    p.add_argument("cluster_file", type=Path, metavar="FILE")
    p.set_defaults(run=cmd_down)

    p = commands.add_parser("status", help="show a running cluster's nodes")
    p.add_argument("--coordinator", default="127.0.0.1:50050", metavar="HOST:PORT")
    add_credential_flags(p)
    p.set_defaults(run=cmd_status)

    p = commands.add_parser("coordinator", help="run a cluster's coordinator alone (each device runs speed node)")
    p.add_argument("--cluster", type=Path, required=True, metavar="FILE")
    p.add_argument("--data-path", choices=DATA_PATHS, help="how the work travels (overrides the file's data_path)")
    p.set_defaults(run=cmd_coordinator)

    p = commands.add_parser("node", help="run one node daemon of a cluster (on its edge device)")
    p.add_argument("--cluster", type=Path, required=True, metavar="FILE")
    p.add_argument("--name", required=True, help="the node's name in the cluster file")
    p.add_argument("--emulate-link-ms", type=link_ms, metavar="MS",
                   help="EMULATED one-way latency per step message, 0 to 60000, for benchmarks (overrides the file)")
    p.set_defaults(run=cmd_node)


def cmd_up(args: argparse.Namespace) -> None:
    from deploy.launcher import up

    up(args.cluster_file, detach=args.detach, emulated_link_ms=args.emulate_link_ms, data_path=args.data_path)


def cmd_down(args: argparse.Namespace) -> None:
    from deploy.launcher import down

    down(args.cluster_file)


def cmd_status(args: argparse.Namespace) -> None:
    from runtime.client import Client

    with Client(args.coordinator, **credentials_of(args)) as client:
        status = client.status()
    print(f"cluster {status.cluster}: {'serving' if status.serving else 'NOT serving'}, "
          f"{status.active_requests} active request(s), {status.queued_requests} queued (at most {status.max_queue}), "
          f"bundle {status.bundle_sha256[:12]}")
    for node in status.nodes:
        beat = f"{node.last_heartbeat_s:.1f} s ago" if node.last_heartbeat_s >= 0 else "never"
        running = "" if list(node.hosting) == list(node.stages) else f" running {list(node.hosting)}"
        print(f"  {node.name:12} {node.address:22} stages {list(node.stages)!s:10} {node.state:8} "
              f"sequences {node.sequences}/{node.max_sequences:<3} {node.provider or '-':24} heartbeat {beat}{running}")


def cmd_coordinator(args: argparse.Namespace) -> None:
    from runtime.coordinator.server import run_coordinator

    configure_logging()
    run_coordinator(args.cluster, data_path=args.data_path)


def cmd_node(args: argparse.Namespace) -> None:
    from nodes.daemon import run_node

    configure_logging()
    run_node(args.cluster, args.name, emulated_link_ms=args.emulate_link_ms)
