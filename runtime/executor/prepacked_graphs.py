"""Machine-local copies of a bundle's graphs, optimized by ONNX Runtime for this CPU, with their
pre-packed weights in a memory-mapped file.

ONNX Runtime re-arranges ("pre-packs") weight matrices for its kernels when a session starts, on the
heap of every process. Saved once to a file and memory-mapped, the pre-packed weights are a single copy
in the page cache for every process of the machine: nodes sharing a machine then share the processor's
caches too, and a session starts without re-packing. The copy is specific to this CPU and this ONNX
Runtime version, so it is made where it runs, keyed by the graph's sha256, and never shipped.

ONNX Runtime 1.31 saves MatMulNBits' pre-packed weights wrongly at accuracy level 4 (int8 activations):
read back, one of SmolLM2-135M's three int4 stages computed noise, and a small model's stage crashed the
process. A graph with such products is saved optimized but without pre-packed weights (its sessions pack
them in memory, as for the original); and any copy is used only after it gave the same bits as the graph
it was made from on a probe input, else it is saved without pre-packed weights, else not used at all.

The cache holds at most $SPEED_GRAPH_CACHE_MB megabytes (DEFAULT_LIMIT_MB): after a new copy is made, the
copies used least recently go until the rest fit (a process that has one mapped keeps reading it; the
file goes when it lets go). `speed cache` lists and clears it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.core.cache_directories import cache_directory
from runtime.core.errors import SpeedError
from runtime.executor.fused_attention import fused_attention_graph
from runtime.executor.kept_logits import kept_logits_graph
from runtime.executor.kept_states import kept_states_graph
from runtime.executor.paired_rows import paired_rows_graph

GRAPH_FILE = "graph.onnx"
DATA_FILE = "graph.data"
log = logging.getLogger("speed.node")

DEFAULT_LIMIT_MB = 2048  # room for the copies of a few bundles; an edge board's disk is small
LIMIT_VARIABLE = "SPEED_GRAPH_CACHE_MB"
# 2: checked against the graph (copies made before are made again); 3: 8-bit products pre-packed; 4: fused
# attention's rotary tables reach one position beyond the context; 5: graphs writing their caches clamp rotary
# positions to the tables; 6: graphs writing their caches, and heads keeping their logits, read and keep hidden
# states on the device; 7: products computing one row apart are given two (paired rows)
COPY_FORMAT = 7
# graphs a node derives from a bundle's, by name: stage and exit graphs that write their own caches and keep their
# hidden states, heads that give their greedy token's probability (what a GPU node runs, to keep its state on the GPU)
DERIVED = {"writes": kept_states_graph, "kept-logits": kept_logits_graph, "attention": fused_attention_graph}
NOT_DERIVED = "not-derived"  # a copy's directory holding only this file: the graph has no such derived form


@dataclass(frozen=True)
class CachedGraph:
    path: Path  # the copy's directory
    bytes: int
    last_used: float  # seconds since the epoch


def cache_limit_bytes() -> int:
    text = os.environ.get(LIMIT_VARIABLE, "")
    if not text:
        return DEFAULT_LIMIT_MB * 2**20
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise SpeedError(f"${LIMIT_VARIABLE} must be a whole number of megabytes (0 keeps only the newest copy), "
                         f"got {text!r}")
    return megabytes * 2**20


def cache_root() -> Path:
    return cache_directory("graphs", "SPEED_GRAPH_CACHE")


def cpu_fingerprint() -> str:
    """What the optimized graph may depend on: the machine type and the CPU's model and features."""
    described = [platform.machine()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")) and line not in described:
                described.append(line)
    except OSError:
        described.append(platform.processor())
    return hashlib.sha256("\n".join(described).encode()).hexdigest()[:12]


Kinds = Collection[tuple[int, int]]  # MatMulNBits products by (weight bits, accuracy level)


def derived_graph(path: Path, derived: str | None, paired: Kinds = ()) -> str | bytes:
    """The graph at `path` (its path), or the serialized graph derived from it by DERIVED[derived]; where products
    of the kinds `paired` compute one row apart, one whose such products never see a single row
    (runtime.executor.paired_rows)."""
    source = str(path) if derived is None else DERIVED[derived](path)
    return paired_rows_graph(source, paired) if paired else source


def _form(derived: str | None, paired: Kinds) -> str:
    """What a copy's name says of its form."""
    return (f"-{derived}" if derived else "") + "".join(f"-paired{bits}b{level}" for bits, level in sorted(paired))


def prepacked_graph(path: Path, sha256: str, *, derived: str | None = None, paired: Kinds = ()) -> Path:
    """The optimized copy of the graph at `path` (whose content has this sha256), or of the graph derived from
    it (DERIVED, paired: derived_graph), made on first use. Raises OSError when the cache cannot be written; the
    caller then loads the original. Raises ValueError where the graph has no such derived form (remembered in the
    cache, so that the next session does not read the graph to find out again)."""
    root = cache_root()
    form = _form(derived, paired)
    target = root / f"{sha256[:16]}{form}-ort{ort.__version__}-{cpu_fingerprint()}-v{COPY_FORMAT}"
    if (target / GRAPH_FILE).is_file():
        os.utime(target)  # used now: the last to go when the cache is full
        return target / GRAPH_FILE
    if (target / NOT_DERIVED).is_file():
        raise ValueError((target / NOT_DERIVED).read_text())
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".", dir=root))
    try:
        try:
            _write_checked_copy(path, staging, derived, paired)
        except ValueError as exc:
            (staging / NOT_DERIVED).write_text(f"{path.name}: {exc}")
            with contextlib.suppress(OSError):  # another process remembered it first
                staging.rename(target)
            raise
        try:
            staging.rename(target)
        except OSError:
            if not (target / GRAPH_FILE).is_file():  # not simply another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    trim_cache(keep=target)
    return target / GRAPH_FILE


def derived_copy(path: Path, sha256: str, derived: str | None, paired: Kinds = ()) -> Path:
    """The graph derived from the one at `path` (whose content has this sha256) as derived_graph derives it, saved in
    the cache on first use, for devices that take no pre-packed copy (a GPU): deriving reads and rewrites the whole
    graph, seconds for a large one at every start. Not specific to this CPU: ONNX Runtime optimizes it when a
    session loads it. Raises OSError when the cache cannot be written; the caller then derives it in memory."""
    root = cache_root()
    target = root / f"{sha256[:16]}{_form(derived, paired)}-derived-v{COPY_FORMAT}"
    if (target / GRAPH_FILE).is_file():
        os.utime(target)
        return target / GRAPH_FILE
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".", dir=root))
    try:
        (staging / GRAPH_FILE).write_bytes(derived_graph(path, derived, paired))
        try:
            staging.rename(target)
        except OSError:
            if not (target / GRAPH_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    trim_cache(keep=target)
    return target / GRAPH_FILE


def _write_checked_copy(path: Path, directory: Path, derived: str | None, paired: Kinds) -> None:
    """The optimized copy with its pre-packed weights, or without them where those change the results."""
    source = derived_graph(path, derived, paired)
    attempts = (False,) if _int8_activation_products(path) else (True, False)
    for save_prepacked in attempts:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1  # the probe's bits must not depend on how its work is split
        options.log_severity_level = 3  # the "hardware-specific optimizations" notice is the point here
        options.optimized_model_filepath = str(directory / GRAPH_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers",
                                          "1" if save_prepacked else "0")
        original = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        feeds = probe_feeds(original)
        reading = ort.SessionOptions()
        reading.intra_op_num_threads = 1
        copy = ort.InferenceSession(str(directory / GRAPH_FILE), sess_options=reading,
                                    providers=["CPUExecutionProvider"])
        if all(np.array_equal(a, b) for a, b in zip(original.run(None, feeds), copy.run(None, feeds))):
            return
        if save_prepacked:
            log.info("the pre-packed copy of %s computed other bits than the graph; saving it without pre-packed "
                     "weights", path.name)
        for file in directory.iterdir():
            file.unlink()
    raise OSError(f"ONNX Runtime's optimized copy of {path.name} does not compute what the graph computes")


def _int8_activation_products(path: Path) -> bool:
    """Whether the graph has 4-bit products with int8 activations, whose saved pre-packed weights ONNX Runtime
    reads back wrong. (The 8-bit head's read back right: saved, they are one copy in the page cache for every
    node of a machine instead of 34 MB packed by each, and a head call is faster.)"""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for node in graph.node:
        attributes = {attribute.name: attribute.i for attribute in node.attribute}
        if node.op_type == "MatMulNBits" and attributes.get("accuracy_level") == 4 and attributes.get("bits", 4) == 4:
            return True
    return False


def probe_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Inputs any stage, head or exit graph accepts: every named dimension 4 (rows, new tokens, cache
    capacity), floats from a fixed seed, integers (cache lengths, token ids) 0."""
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        shape = [dim if isinstance(dim, int) else 4 for dim in arg.shape]
        if arg.type == "tensor(float)":
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            feeds[arg.name] = np.zeros(shape, np.int64 if arg.type == "tensor(int64)" else np.int32)
    return feeds


def cached_graphs() -> list[CachedGraph]:
    """The copies in the cache, least recently used first."""
    root = cache_root()
    if not root.is_dir():
        return []
    entries = []
    for directory in root.iterdir():
        if directory.name.startswith(".") or not directory.is_dir():
            continue  # a copy still being made
        try:
            size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
            entries.append(CachedGraph(directory, size, directory.stat().st_mtime))
        except OSError:
            continue  # removed meanwhile
    return sorted(entries, key=lambda entry: entry.last_used)


def trim_cache(keep: Path | None = None) -> list[CachedGraph]:
    """Remove the least recently used copies (never `keep`) until the cache fits its limit; returns them."""
    entries = cached_graphs()
    excess = sum(entry.bytes for entry in entries) - cache_limit_bytes()
    removed = []
    for entry in entries:
        if excess <= 0:
            break
        if entry.path != keep:
            shutil.rmtree(entry.path, ignore_errors=True)
            excess -= entry.bytes
            removed.append(entry)
    return removed


def clear_cache() -> list[CachedGraph]:
    """Remove every copy; the next session of each graph makes its own again."""
    entries = cached_graphs()
    for entry in entries:
        shutil.rmtree(entry.path, ignore_errors=True)
    return entries
