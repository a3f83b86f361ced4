"""The `speed` command line: one parser, one module per command family; each command parses its
flags and calls one function."""

from __future__ import annotations

import os
import signal
import sys

from runtime.cli import bench, cache, chat, cluster, decode, models, security
from runtime.cli.arguments import OneLineErrorParser
from runtime.core.errors import SpeedError


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="speed", description="SPEED: speculative pipelined decoding runtime")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)
    for family in (models, decode, chat, cluster, bench, security, cache):
        family.add_commands(commands)
    return parser


TRAINING_MODULES = {"torch", "onnxscript", "gguf"}  # the `train` extra, which nodes do without
PLOT_MODULES = {"matplotlib"}  # the `plot` extra: only `speed bench --plot` draws


def missing_extra(module: str | None) -> str | None:
    """The sentence saying what to install when a module of an optional extra is missing; None for any other."""
    if module in TRAINING_MODULES:
        return (f"this command needs {module}, part of the training extra; install it with: "
                "pip install -e '.[train]' -c constraints.txt")
    if module in PLOT_MODULES:
        return f"--plot needs {module}, the plot extra; install it with: pip install -e '.[plot]'"
    return None


def closed_pipe() -> int:
    """The reader of the output went away: stop quietly, as a process ended by SIGPIPE does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter flushes stdout once more on its way out
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for position, argument in enumerate(argv, start=1):
        try:
            argument.encode("utf-8")  # bytes that are not UTF-8 reach Python as lone surrogates, which refuse
        except UnicodeEncodeError:
            print(f"speed: error: argument {position} is not valid UTF-8 text; pass text in UTF-8", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
        sys.stdout.flush()  # a reader that went away (`| head`) is met here, not at the interpreter's exit
    except BrokenPipeError:
        return closed_pipe()
    except SpeedError as exc:
        print(f"speed {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if (sentence := missing_extra(exc.name)) is None:
            raise
        print(f"speed {args.command}: error: {sentence}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"speed {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0

