"""`speed cache`: this machine's pre-packed graph copies, listed or cleared."""

from __future__ import annotations

import argparse
import time

MB = 2**20


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("cache", help="list or clear the pre-packed graph copies ONNX Runtime made on this machine")
    p.add_argument("--clear", action="store_true", help="remove every copy (each is made again when a session needs it)")
    p.set_defaults(run=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> None:
    from runtime.executor.prepacked_graphs import LIMIT_VARIABLE, cache_limit_bytes, cache_root, cached_graphs, clear_cache

    root = cache_root()
    if args.clear:
        removed = clear_cache()
        print(f"removed {len(removed)} cop{'y' if len(removed) == 1 else 'ies'} "
              f"({sum(e.bytes for e in removed) / MB:.1f} MB) from {root}")
        return
    entries = cached_graphs()
    total = sum(entry.bytes for entry in entries)
    print(f"{root}: {len(entries)} cop{'y' if len(entries) == 1 else 'ies'}, {total / MB:.1f} MB of at most "
          f"{cache_limit_bytes() / MB:.0f} MB (${LIMIT_VARIABLE}); the least recently used go first")
    now = time.time()
    for entry in reversed(entries):  # most recently used first
        print(f"  {entry.path.name}  {entry.bytes / MB:8.1f} MB  used {_ago(now - entry.last_used)}")


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"
