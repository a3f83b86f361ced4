"""Commands that run and watch a cluster: up, down, status, and one coordinator or node process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.cli.arguments import add_credential_flags, configure_logging, credentials_of, link_ms, number, whole
from runtime.core.cluster_file import DATA_PATHS
from runtime.core.errors import SpeedError


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

    p = commands.add_parser("status", help="show a running cluster's nodes: a table, --watch to refresh it, or --json")
    p.add_argument("--coordinator", default="127.0.0.1:50050", metavar="HOST:PORT")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--watch", action="store_true", help="refresh the table every --interval seconds until Ctrl-C")
    shown.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.add_argument("--interval", type=number(0.1, 3600), default=1.0, metavar="S",
                   help="seconds between refreshes with --watch, 0.1 to 3600 (default 1)")
    add_credential_flags(p)
    p.set_defaults(run=cmd_status)

    p = commands.add_parser("plan", help="predict the tokens/s of placements of a running cluster's stages, from what "
                                         "its nodes measured of themselves")
    p.add_argument("cluster_file", type=Path, metavar="FILE", help="the cluster file of a running cluster")
    p.add_argument("--top", type=whole(1, 1000), default=5, help="candidates printed after the file's own (default 5)")
    p.add_argument("--json", action="store_true", help="every candidate as one JSON object, the file's own first")
    p.add_argument("--write", type=Path, metavar="COPY",
                   help="write a copy of the file, beside it, whose nodes run the best candidate's stages (comments kept)")
    add_credential_flags(p)
    p.set_defaults(run=cmd_plan)

    p = commands.add_parser("coordinator", help="run a cluster's coordinator alone (each device runs speed node)")
    p.add_argument("--cluster", type=Path, required=True, metavar="FILE")
    p.add_argument("--data-path", choices=DATA_PATHS, help="how the work travels (overrides the file's data_path)")
    p.set_defaults(run=cmd_coordinator)

    p = commands.add_parser("node", help="run one node daemon of a cluster (on its edge device)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--cluster", type=Path, metavar="FILE", help="the cluster file, which names this node")
    where.add_argument("--join", metavar="HOST:PORT",
                       help="join the running cluster of this coordinator as a node its file does not name")
    p.add_argument("--name", required=True, help="the node's name (in the cluster file, or new with --join)")
    joining = p.add_argument_group("with --join")
    joining.add_argument("--address", metavar="HOST:PORT", help="where the node serves (required with --join)")
    joining.add_argument("--bundle", type=Path, help="the cluster's bundle on this machine (required with --join)")
    joining.add_argument("--certs", type=Path, metavar="DIR",
                         help="a secure cluster: a directory with ca.pem and this node's certificate "
                              "(`speed certs add-node`), and the cluster's secret unless --secret-file")
    joining.add_argument("--secret-file", type=Path, metavar="FILE", help="a copy of the cluster's secret file")
    joining.add_argument("--threads", type=whole(0, 256, "one per core"), default=1, help="intra-op threads (default 1)")
    joining.add_argument("--max-sequences", type=whole(1, 4096), default=8, help="sequences held at once (default 8)")
    joining.add_argument("--link-port", type=whole(1, 65535), metavar="PORT",
                         help="take the other nodes' direct links (ring hops) on this port (default: any free port)")
    p.add_argument("--emulate-link-ms", type=link_ms, metavar="MS",
                   help="EMULATED one-way latency per step message, 0 to 60000, for benchmarks (overrides the file)")
    p.add_argument("--drain", action="store_true",
                   help="instead of running the node: make the running node hand its stages over to the other nodes "
                        "(what they carried is replayed, the text unchanged) and stop")
    p.set_defaults(run=cmd_node)


def cmd_up(args: argparse.Namespace) -> None:
    from deploy.launcher import up
    from runtime.cli.progress import stderr_progress

    up(args.cluster_file, detach=args.detach, emulated_link_ms=args.emulate_link_ms, data_path=args.data_path,
       progress=stderr_progress())


def cmd_down(args: argparse.Namespace) -> None:
    from deploy.launcher import down

    down(args.cluster_file)


def cmd_plan(args: argparse.Namespace) -> None:
    from runtime.bench.plan import format_plan, plan
    from runtime.client import Client
    from runtime.core.bundle import load_bundle
    from runtime.core.cluster_file import load_cluster

    spec = load_cluster(args.cluster_file)
    with Client(spec.coordinator.address, **credentials_of(args)) as client:
        status = client.status()
    report = plan(spec, load_bundle(spec.bundle, verify=False), status)
    print(json.dumps(report) if args.json else format_plan(report, args.top))
    if args.write:
        from runtime.core.cluster_file_edit import write_with_stages

        mode = f"{report['mode']}_tokens_per_s"
        own, best = report["candidates"][0], max(report["candidates"], key=lambda c: c[mode])
        write_with_stages(args.cluster_file, args.write, best["placement"])
        print(f"wrote {args.write}: {'  '.join(f'{name}: {stages}' for name, stages in best['placement'].items())}, "
              f"predicted {best[mode]:.1f} tokens/s {report['mode']} against the file's {own[mode]:.1f}",
              file=sys.stderr if args.json else sys.stdout)


def cmd_status(args: argparse.Namespace) -> None:
    from runtime.cli.status_view import show_status, watch_status

    if args.watch:
        watch_status(args.coordinator, credentials_of(args), interval_s=args.interval)
    else:
        show_status(args.coordinator, credentials_of(args), as_json=args.json)


def cmd_coordinator(args: argparse.Namespace) -> None:
    from runtime.coordinator.server import run_coordinator

    configure_logging()
    run_coordinator(args.cluster, data_path=args.data_path)


def cmd_node(args: argparse.Namespace) -> None:
    joining = None
    if args.join:
        from nodes.join import Joining

        if not args.address or not args.bundle:
            raise SpeedError("a joining node needs --address (where it serves) and --bundle (the cluster's bundle)")
        joining = Joining(args.join, args.name, args.address, args.bundle, certs=args.certs,
                          secret_file=args.secret_file, threads=args.threads, max_sequences=args.max_sequences,
                          link_port=args.link_port)
    if args.drain:
        from nodes.drain import drain_joined, drain_node

        reply = drain_joined(joining) if joining else drain_node(args.cluster, args.name)
        print(f"node {args.name} drained and stopping; the stages run on "
              f"{', '.join(f'{place.stage}: {place.node}' for place in reply.placement) or 'no node (it ran none)'}")
        return
    configure_logging()
    if joining:
        from nodes.join import join_cluster

        join_cluster(joining)
        return
    from nodes.daemon import run_node

    run_node(args.cluster, args.name, emulated_link_ms=args.emulate_link_ms)
