"""Where a decoded token's time goes in one process: ONNX Runtime's runs, copies between host and device, binding,
and the host's own work around them (Python, numpy).

On a GPU a small model's token is mostly the host's work and the waits between calls, not the kernels, so this
says what to cut next. ONNX Runtime's calls are timed by cProfile, which measures a native call's own time
closely; the host's share is the unprofiled run's time less those calls, since cProfile slows Python itself.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Callable

NATIVE = "<built-in method onnxruntime.capi.onnxruntime_pybind11_state."  # how cProfile names ONNX Runtime's calls
KINDS = {  # ONNX Runtime's native calls by what they do
    "runs": {"run", "run_with_iobinding"},
    "copies": {"update_inplace", "numpy", "ortvalue_from_numpy", "copy_outputs_to_cpu", "get_outputs"},
    "binding": {"bind_input", "bind_output", "bind_ortvalue_input", "bind_ortvalue_output", "bind_cpu_input",
                "clear_binding_inputs", "clear_binding_outputs"},
}


def time_per_token(decode: Callable[[], int], runs: int = 2) -> dict:
    """decode() decodes and returns how many tokens it made; after a warm-up it runs `runs` times plain and `runs`
    times under cProfile, and the least disturbed of each counts (this machine's noise only ever adds). Milliseconds
    a token: the whole, ONNX Runtime's calls by kind (with calls a token), and the host's work besides."""
    decode()
    whole = min(_timed(decode) for _ in range(runs))
    seconds, calls = min((_native_calls(decode) for _ in range(runs)), key=lambda spent: sum(spent[0].values()))
    native = sum(seconds.values())
    return {"ms": round(whole * 1e3, 3),
            "onnx_runtime_ms": {kind: round(s * 1e3, 3) for kind, s in seconds.items()},
            "onnx_runtime_calls": {kind: round(count, 2) for kind, count in calls.items()},
            "host_ms": round(max(whole - native, 0.0) * 1e3, 3)}


def _timed(decode: Callable[[], int]) -> float:
    started = time.perf_counter()
    tokens = decode()
    return (time.perf_counter() - started) / tokens


def _native_calls(decode: Callable[[], int]) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds and calls a token in ONNX Runtime's native calls, by kind."""
    profile = cProfile.Profile()
    profile.enable()
    tokens = decode()
    profile.disable()
    seconds = dict.fromkeys([*KINDS, "other"], 0.0)
    calls = dict.fromkeys(seconds, 0.0)
    for (file, _, name), (_, count, own, *_) in pstats.Stats(profile).stats.items():
        if file == "~" and name.startswith(NATIVE):
            method = name[len(NATIVE) : -1]
            kind = next((kind for kind, methods in KINDS.items() if method in methods), "other")
            seconds[kind] += own / tokens
            calls[kind] += count / tokens
    return seconds, calls


def describe_token_time(name: str, spent: dict) -> str:
    ms, calls = spent["onnx_runtime_ms"], spent["onnx_runtime_calls"]
    return (f"{name} {spent['ms']:.3f} ms a token: ONNX Runtime's runs {ms['runs']:.3f} ({calls['runs']:g} calls), "
            f"copies {ms['copies']:.3f} ({calls['copies']:g}), binding {ms['binding']:.3f}, other calls {ms['other']:.3f}, "
            f"the host's work {spent['host_ms']:.3f}")
