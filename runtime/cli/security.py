"""Commands that secure a cluster: certs init, tokens add and remove."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.cli.arguments import OneLineErrorParser, whole
from runtime.core.errors import SpeedError


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("certs", help="certificates of a secure cluster")
    certs = p.add_subparsers(dest="certs_command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)
    q = certs.add_parser("init", help="a CA and one certificate per process, a client certificate and a client token")
    q.add_argument("directory", type=Path, metavar="DIR")
    q.add_argument("--cluster", type=Path, required=True, metavar="FILE", help="names and addresses come from it")
    q.add_argument("--days", type=whole(1, 36500), default=365, help="validity of the process certificates (default 365)")
    q.add_argument("--force", action="store_true", help="replace DIR if it exists")
    q.set_defaults(run=cmd_certs_init)
    q = certs.add_parser("add-node", help="a certificate for a node that joins without a line in the cluster file "
                                          "(speed node --join)")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--cluster", type=Path, required=True, metavar="FILE", help="a cluster file with a security section")
    q.add_argument("--address", required=True, metavar="HOST:PORT", help="where the node will serve")
    q.add_argument("--days", type=whole(1, 36500), default=365, help="validity of the certificate (default 365)")
    q.add_argument("--force", action="store_true", help="replace the node's certificate if it exists")
    q.set_defaults(run=cmd_certs_add_node)
    q = certs.add_parser("secret", help="a new cluster secret in FILE, for a cluster file's secret_file (copy it to "
                                        "every machine of the cluster)")
    q.add_argument("file", type=Path, metavar="FILE")
    q.add_argument("--force", action="store_true", help="replace FILE if it exists")
    q.set_defaults(run=cmd_certs_secret)

    p = commands.add_parser("tokens", help="client bearer tokens of a secure cluster")
    tokens = p.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)
    for name, what, run in (("add", "make a token for NAME and print it (shown once)", cmd_tokens_add),
                            ("remove", "revoke NAME's token", cmd_tokens_remove)):
        q = tokens.add_parser(name, help=what)
        q.add_argument("name", metavar="NAME")
        q.add_argument("--cluster", type=Path, required=True, metavar="FILE", help="a cluster file with a security section")
        q.set_defaults(run=run)


def cmd_certs_init(args: argparse.Namespace) -> None:
    from deploy.certs import init_certs
    from runtime.core.cluster_file import load_cluster

    written = init_certs(args.directory, load_cluster(args.cluster), days=args.days, force=args.force)
    print(f"wrote {len(written)} files to {args.directory} (keys and tokens readable by you only): {', '.join(written)}")
    print(f"the client token is in {args.directory / 'client.token'}; more with: speed tokens add NAME --cluster "
          f"{args.cluster}")


def cmd_certs_add_node(args: argparse.Namespace) -> None:
    from deploy.certs import add_node_cert
    from runtime.core.cluster_file import load_cluster

    spec = load_cluster(args.cluster)
    try:
        files = add_node_cert(spec, args.name, args.address, days=args.days, force=args.force)
    except ValueError as exc:  # the address
        raise SpeedError(f"--address: {exc}") from None
    certs = spec.security.certs
    print(f"wrote {certs / files[1]} and {certs / files[2]}; copy {', '.join(files)} from {certs} to a directory DIR "
          f"on the node's machine, then: speed node --join {spec.coordinator.address} --name {args.name} "
          f"--address {args.address} --bundle BUNDLE --certs DIR")


def cmd_certs_secret(args: argparse.Namespace) -> None:
    from runtime.wire.cluster_secret import write_secret

    if args.file.exists() and not args.force:
        raise SpeedError(f"{args.file} already exists; pass --force to replace it (every process of the cluster "
                         "then needs the new one)")
    write_secret(args.file)
    print(f"wrote a new cluster secret to {args.file} (readable by you only); name it as secret_file in the cluster "
          "file and copy it to every machine of the cluster")


def tokens_file(cluster: Path) -> Path:
    from runtime.coordinator.tokens import TOKENS_FILE
    from runtime.core.cluster_file import load_cluster

    spec = load_cluster(cluster)
    if spec.security is None:
        raise SpeedError(f"{cluster} has no security section, so its clients need no token; add one (see speed certs init)")
    if not spec.security.certs.is_dir():
        raise SpeedError(f"{spec.security.certs} does not exist; make it first with speed certs init "
                         f"{spec.security.certs} --cluster {cluster}")
    return spec.security.certs / TOKENS_FILE


def cmd_tokens_add(args: argparse.Namespace) -> None:
    from runtime.coordinator.tokens import add_token

    print(add_token(tokens_file(args.cluster), args.name))


def cmd_tokens_remove(args: argparse.Namespace) -> None:
    from runtime.coordinator.tokens import remove_token

    remove_token(tokens_file(args.cluster), args.name)
    print(f"token {args.name} removed; the coordinator refuses it from now on")
