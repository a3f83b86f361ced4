"""Machine-local copies of a bundle's graphs, optimized by ONNX Runtime for this CPU, with their
pre-packed weights in a memory-mapped file.

ONNX Runtime re-arranges ("pre-packs") weight matrices for its kernels when a session starts, on the
heap of every process. Saved once to a file and memory-mapped, the pre-packed weights are a single copy
in the page cache for every process of the machine: nodes sharing a machine then share the processor's
caches too, and a session starts without re-packing. The copy is specific to this CPU and this ONNX
Runtime version, so it is made where it runs, keyed by the graph's sha256, and never shipped.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
from pathlib import Path

import onnxruntime as ort

GRAPH_FILE = "graph.onnx"
DATA_FILE = "graph.data"


def cache_root() -> Path:
    if os.environ.get("SPEED_GRAPH_CACHE"):
        return Path(os.environ["SPEED_GRAPH_CACHE"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "speed" / "graphs"


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


def prepacked_graph(path: Path, sha256: str) -> Path:
    """The optimized copy of the graph at `path` (whose content has this sha256), made on first use.
    Raises OSError when the cache cannot be written; the caller then loads the original."""
    root = cache_root()
    target = root / f"{sha256[:16]}-ort{ort.__version__}-{cpu_fingerprint()}"
    if (target / GRAPH_FILE).is_file():
        return target / GRAPH_FILE
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".", dir=root))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # the "hardware-specific optimizations" notice is the point here
        options.optimized_model_filepath = str(staging / GRAPH_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        try:
            staging.rename(target)
        except OSError:
            if not (target / GRAPH_FILE).is_file():  # not simply another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / GRAPH_FILE
