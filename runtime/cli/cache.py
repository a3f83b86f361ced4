"""`speed cache`: this machine's pre-packed graph copies and kept traces, listed or cleared."""

from __future__ import annotations

import argparse
import time

MB = 2**20


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("cache", help="list or clear the pre-packed graph copies ONNX Runtime made on this machine "
                                          "and the traces imports and exports kept")
    p.add_argument("--clear", action="store_true", help="remove every copy and trace (a copy is made again when a "
                                                        "session needs it, a trace when an export does)")
    p.set_defaults(run=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> None:
    from runtime.executor.prepacked_graphs import LIMIT_VARIABLE, cache_limit_bytes, cache_root, cached_graphs, clear_cache
    from runtime.models.trace_cache import ENTRIES, clear_traces, kept_traces, trace_cache_root

    root, traces = cache_root(), trace_cache_root()
    if args.clear:
        removed, unkept = clear_cache(), clear_traces()
        print(f"removed {_count(len(removed), 'copy', 'copies')} ({sum(e.bytes for e in removed) / MB:.1f} MB) from "
              f"{root}")
        print(f"removed {_count(len(unkept), 'trace', 'traces')} ({sum(t.bytes for t in unkept) / MB:.1f} MB) from "
              f"{traces}")
        return
    entries = cached_graphs()
    total = sum(entry.bytes for entry in entries)
    print(f"{root}: {_count(len(entries), 'copy', 'copies')}, {total / MB:.1f} MB of at most "
          f"{cache_limit_bytes() / MB:.0f} MB (${LIMIT_VARIABLE}); the least recently used go first")
    now = time.time()
    for entry in reversed(entries):  # most recently used first
        print(f"  {entry.path.name}  {entry.bytes / MB:8.1f} MB  used {_ago(now - entry.last_used)}")
    kept = kept_traces()
    print(f"{traces}: {_count(len(kept), 'trace', 'traces')} of the graphs imports and exports traced, "
          f"{sum(trace.bytes for trace in kept) / MB:.1f} MB; the {ENTRIES} used last are kept")
    for trace in kept:
        print(f"  {trace.path.name}  {trace.bytes / MB:8.1f} MB  used {_ago(now - trace.last_used)}")


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"
