"""Where a decoded token's time goes in one process: ONNX Runtime's runs, copies between host and device, binding,
and the host's own work around them (Python, numpy).

On a GPU a small model's token is mostly the host's work and the waits between calls, not the kernels, so this
says what to cut next. ONNX Runtime's entry points are timed in the same runs as the whole, each call by a clock
read before and after it, which costs about a microsecond a call and nothing elsewhere (a profiler's hooks would
slow every Python call, and runs apart differ by more than the host's share on a busy machine).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator

import onnxruntime as ort
from onnxruntime.capi.onnxruntime_inference_collection import Session

ENTRY_POINTS = {  # ONNX Runtime's Python entry points by what they do: (class, methods)
    "runs": [(Session, ("run", "run_with_iobinding"))],
    "copies": [(ort.OrtValue, ("numpy", "update_inplace")), (ort.IOBinding, ("copy_outputs_to_cpu", "get_outputs"))],
    "binding": [(ort.IOBinding, ("bind_input", "bind_output", "bind_ortvalue_input", "bind_ortvalue_output",
                                 "bind_cpu_input"))],
}


def time_per_token(decode: Callable[[], int], runs: int = 2) -> dict:
    """decode() decodes and returns how many tokens it made; after a warm-up it runs `runs` times, and the fastest
    counts (this machine's noise only ever adds). Milliseconds a token: the whole, ONNX Runtime's calls by kind
    (with calls a token), and the host's work besides."""
    decode()
    fastest = None
    for _ in range(runs):
        with _timed_entry_points() as spent:
            started = time.perf_counter()
            tokens = decode()
            whole = time.perf_counter() - started
        if fastest is None or whole / tokens < fastest[0]:
            fastest = whole / tokens, {kind: seconds / tokens for kind, (seconds, _) in spent.items()}, \
                {kind: calls / tokens for kind, (_, calls) in spent.items()}
    whole, seconds, calls = fastest
    return {"ms": round(whole * 1e3, 3),
            "onnx_runtime_ms": {kind: round(s * 1e3, 3) for kind, s in seconds.items()},
            "onnx_runtime_calls": {kind: round(count, 2) for kind, count in calls.items()},
            "host_ms": round((whole - sum(seconds.values())) * 1e3, 3)}


@contextlib.contextmanager
def _timed_entry_points() -> Iterator[dict[str, list[float]]]:
    """While open, every call of ENTRY_POINTS adds its seconds and one call to its kind's [seconds, calls]."""
    spent = {kind: [0.0, 0] for kind in ENTRY_POINTS}
    originals = [(cls, name, cls.__dict__[name]) for points in ENTRY_POINTS.values() for cls, names in points
                 for name in names]
    depth = [0]  # an entry point calling another is counted once, as the outer one

    def timed(kind: str, method: Callable) -> Callable:
        @functools.wraps(method)
        def call(*args, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    spent[kind][0] += time.perf_counter() - started
                    spent[kind][1] += 1
        return call

    try:
        for kind, points in ENTRY_POINTS.items():
            for cls, names in points:
                for name in names:
                    setattr(cls, name, timed(kind, cls.__dict__[name]))
        yield spent
    finally:
        for cls, name, method in originals:
            setattr(cls, name, method)


def describe_token_time(name: str, spent: dict) -> str:
    ms, calls = spent["onnx_runtime_ms"], spent["onnx_runtime_calls"]
    return (f"{name} {spent['ms']:.3f} ms a token: ONNX Runtime's runs {ms['runs']:.3f} ({calls['runs']:g} calls), "
            f"copies {ms['copies']:.3f} ({calls['copies']:g}), binding {ms['binding']:.3f} ({calls['binding']:g}), "
            f"the host's work {spent['host_ms']:.3f}")
