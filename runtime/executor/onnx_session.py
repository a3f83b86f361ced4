"""ONNX Runtime sessions that report the provider they really got.

`onnxruntime-gpu` on a machine without CUDA lists the CUDA provider yet silently runs on CPU, so
the provider is read back from the session and a CUDA request that was not honoured is an error.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from runtime.core.errors import SpeedError
from runtime.executor.prepacked_graphs import Kinds, derived_copy, derived_graph, prepacked_graph

log = logging.getLogger("speed.node")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def create_session(path: Path, *, device: str = "cpu", threads: int = 0, sha256: str | None = None,
                   derived: str | None = None, paired: Kinds = (), graph_capture: bool = False
                   ) -> ort.InferenceSession:
    """threads: intra-op threads, 0 = ONNX Runtime's default (one per physical core). sha256: the graph's
    hash from its bundle; on CPU the session then loads this machine's pre-packed copy of the graph, elsewhere
    the copy of the derived graph saved on first use. derived: run the graph derived from it by this name
    (prepacked_graphs.DERIVED). paired: the kinds of products given two rows where a call has one
    (runtime.executor.paired_rows). graph_capture: on CUDA, let calls be captured and replayed as CUDA graphs
    (runtime.executor.decode_tiles; every call must then name its capture id); a graph that cannot be captured
    runs without."""
    if device not in PROVIDERS:
        raise SpeedError(f"unknown device {device!r}; expected one of {', '.join(PROVIDERS)}")
    source: str | bytes | None = None
    if sha256 is not None and (device == "cpu" or derived is not None or paired):
        try:
            source = str(prepacked_graph(path, sha256, derived=derived, paired=paired) if device == "cpu"
                         else derived_copy(path, sha256, derived, paired))
        except OSError as exc:
            log.warning("no machine-local copy of %s (%s); loading the graph itself", path.name, exc)
    if source is None:
        source = derived_graph(path, derived, paired)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    # a process holds several sessions (one per stage graph, and the head), each with its own thread pool. Its
    # threads spin for work only while a call runs and stop when it returns: spinning between calls (ONNX
    # Runtime's default) let idle sessions' threads take the cores from the running one (SmolLM2 on 2 cores:
    # 2 threads decoded 2.3x slower than 1), and never spinning made every operator wait for a sleeping thread
    # (2 threads 0.85x of 1); spinning within a call only: 1.18x.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only: no warnings about nodes placed on CPU
    wanted = [PROVIDERS[device]] + ([PROVIDERS["cpu"]] if device != "cpu" else [])
    if device == "cuda":
        load_cuda_libraries()
    # a provider that cannot load is reported below in one sentence, not by ONNX Runtime's native log
    ort.set_default_logger_severity(4)
    session = None
    if graph_capture and device == "cuda":
        try:
            session = ort.InferenceSession(source, sess_options=options,
                                           providers=[(PROVIDERS[device], {"enable_cuda_graph": "1"}), *wanted[1:]])
        except Exception as exc:  # ONNX Runtime refuses graphs with nodes it cannot capture, with several kinds
            log.warning("%s runs without CUDA graphs: %s", path.name, str(exc).splitlines()[0][:200])
    if session is None:
        session = ort.InferenceSession(source, sess_options=options, providers=wanted)
    got = session.get_providers()[0]
    if got != PROVIDERS[device]:
        raise SpeedError(f"device {device} was requested but ONNX Runtime runs {path.name} on {got}; check that "
                         "this machine has an NVIDIA GPU with the CUDA and cuDNN libraries onnxruntime-gpu needs, "
                         "and that onnxruntime-gpu (not onnxruntime) is installed")
    return session


@functools.cache  # once a process
def load_cuda_libraries() -> None:
    """onnxruntime-gpu's CUDA provider finds CUDA's libraries on the loader's path only; where they are pip
    packages beside it (onnxruntime-gpu[cuda,cudnn]), ONNX Runtime's preload_dlls loads them first. It reports
    on stdout, which a command's JSON owns, so what it says goes to the log."""
    preload = getattr(ort, "preload_dlls", None)  # ONNX Runtime 1.21 and later; a CPU build returns at once
    if preload is None:
        return
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - the session's own start then says what is missing
            print(exc)
    if said.getvalue().strip():
        log.info("loading CUDA's libraries: %s", " ".join(said.getvalue().split()))


class LazySession:
    """A session opened at its first use, which its holder may release to give its memory back (a classifier that
    a node runs only for the last stage, or for guesses); the next use opens it again. A call running on the
    released session keeps it until it returns."""

    def __init__(self, open_session: Callable[[], ort.InferenceSession]):
        self._open = open_session
        self._session: ort.InferenceSession | None = None
        self._opening = threading.Lock()
        self.outputs: list[str] = []  # its output names, once opened

    def get(self) -> ort.InferenceSession:
        session = self._session
        if session is None:
            with self._opening:
                if self._session is None:
                    opened = self._open()
                    self.outputs = [out.name for out in opened.get_outputs()]
                    self._session = opened
                session = self._session
        return session

    @property
    def is_open(self) -> bool:
        return self._session is not None

    def release(self) -> None:
        with self._opening:
            self._session = None
