"""Traced graphs kept on this machine between exports ($SPEED_TRACE_CACHE, default ~/.cache/speed/traces):
the files only, each the serialized trace its key names (runtime.models.trace_binding says what a trace holds
and how an export uses it). The ENTRIES used last are kept. No torch or onnx here: `speed cache` lists and
clears them where only the runtime is installed."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.core.cache_directories import cache_directory

ENTRIES = 8  # a few architectures' stage sizes and heads; a SmolLM2 stage's trace is 2.2 MB
SUFFIX = ".onnx"
log = logging.getLogger("speed.export")


@dataclass(frozen=True)
class KeptTrace:
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch


def trace_cache_root() -> Path:
    return cache_directory("traces", "SPEED_TRACE_CACHE")


def read_trace(key: str) -> bytes | None:
    """The trace kept as `key`, now the one used last; None when there is none or it cannot be read."""
    path = trace_cache_root() / f"{key}{SUFFIX}"
    try:
        data = path.read_bytes()
        path.touch()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("traced again: the kept trace %s cannot be read (%s)", path, exc)
        return None
    return data


def write_trace(key: str, data: bytes) -> None:
    """Keep `data` as `key` where the cache can be written (else say so: the next export traces again)."""
    root = trace_cache_root()
    partial = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, suffix=".partial", delete=False) as file:
            partial = Path(file.name)
            file.write(data)
        os.replace(partial, root / f"{key}{SUFFIX}")  # whole or absent, even beside another export
        for trace in kept_traces()[ENTRIES:]:
            with contextlib.suppress(OSError):
                trace.path.unlink()
    except OSError as exc:
        if partial is not None:
            partial.unlink(missing_ok=True)
        log.warning("could not keep the trace in %s (%s); the next export traces again", root, exc)


def kept_traces() -> list[KeptTrace]:
    """The kept traces, the one used last first."""
    root = trace_cache_root()
    if not root.is_dir():
        return []
    kept = []
    for path in root.glob(f"*{SUFFIX}"):
        with contextlib.suppress(OSError):  # removed meanwhile
            stat = path.stat()
            kept.append(KeptTrace(path, stat.st_size, stat.st_mtime))
    return sorted(kept, key=lambda trace: trace.last_used, reverse=True)


def clear_traces() -> list[KeptTrace]:
    """Remove every kept trace (the next export of its architecture traces again); returns them."""
    removed = []
    for trace in kept_traces():
        with contextlib.suppress(OSError):
            trace.path.unlink()
            removed.append(trace)
    return removed
