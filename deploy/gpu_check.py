"""`make gpu-check`: what a machine with an NVIDIA GPU says about the CUDA path, in one JSON report.

Run it where the runtime's requirements and onnxruntime-gpu are installed, or give --wheels DIR to
install them first from wheels in DIR, offline (a borrowed GPU machine often reaches no index). Every
step has its own time limit, so the whole check fits in 8 minutes on one GPU:
1. the machine: the GPU (nvidia-smi), ONNX Runtime's version and providers;
2. the GPU tests (tests/test_device.py, tests/test_device_resident.py), where pytest is installed;
3. the tokens on the GPU against the CPU's: `speed reference`, greedy and sampled, plain and speculative;
4. whether the stage graphs run as CUDA graphs (decode tiles), and `speed bench --reference` and `--local` on
   the GPU, on the GPU without CUDA graphs (SPEED_CUDA_GRAPHS=0) and on the CPU (`--local` also says where a
   token's time goes: ONNX Runtime's runs, copies between host and device, binding, the host's own work);
5. three CUDA nodes on the one GPU (deploy/local.yaml, every node `device: cuda`): `speed bench FILE`.
6. with --bundle DIR (e.g. SmolLM2's fast kind, carried to the machine: it reaches no index), that bundle's
   tokens on the GPU against the CPU's, greedy, and `speed bench --reference --bundle DIR` on both.
A step that fails is recorded with the end of its output, and the next one runs. `--device cpu` runs
every step on the CPU instead, which checks the script itself where there is no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_REQUIREMENTS = ["numpy", "grpcio", "grpcio-health-checking", "protobuf", "pyyaml", "tokenizers", "jinja2",
                        "prometheus-client", "cryptography", "rich", "psutil", "onnx"]
# sampled twice: drawn from a row's largest logits, which top-k always lets decide, and without top-k
SAMPLINGS = {"greedy": [], "sampled": ["--temperature", "0.8", "--seed", "3"],
             "sampled, top-k": ["--temperature", "0.8", "--top-k", "40", "--seed", "3"]}
PROMPT = "ROMEO: But soft, what light"


def run(command: list[str], timeout_s: float, env: dict[str, str] | None = None) -> dict:
    """A step's outcome: exit status, seconds, its output parsed as JSON where it is, else the output's end."""
    started = time.monotonic()
    try:
        # the packages on PYTHONPATH stay (requirements installed with pip --target, as where no index is at hand)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": path, **(env or {})})
        outcome = {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
    except subprocess.TimeoutExpired as exc:
        outcome = {"rc": None, "stdout": exc.stdout or "", "stderr": f"timed out after {timeout_s:g} s"}
    outcome["seconds"] = round(time.monotonic() - started, 1)
    try:
        outcome["result"] = json.loads(outcome["stdout"])
        del outcome["stdout"]
    except (json.JSONDecodeError, TypeError):
        outcome["stdout"] = str(outcome["stdout"])[-2000:]
    if outcome["rc"] == 0:
        del outcome["stderr"]
    else:
        outcome["stderr"] = str(outcome["stderr"])[-2000:]
    return outcome


def speed(*arguments: str, timeout_s: float, env: dict[str, str] | None = None) -> dict:
    return run([sys.executable, "-m", "runtime.cli", *arguments], timeout_s, env)


def install(wheels: Path) -> dict:
    """The runtime's requirements and onnxruntime-gpu from local wheels; the CPU-only onnxruntime goes first,
    since both install the same module."""
    run([sys.executable, "-m", "pip", "uninstall", "--yes", "onnxruntime"], 120)
    return run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
                "onnxruntime-gpu", *RUNTIME_REQUIREMENTS], 300)


def machine() -> dict:
    gpu = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], 30) \
        if shutil.which("nvidia-smi") else {"rc": None, "stdout": "no nvidia-smi"}
    probe = run([sys.executable, "-c", "import json, onnxruntime as ort; print(json.dumps({'version': ort.__version__, "
                 "'providers': ort.get_available_providers()}))"], 60)
    return {"gpu": gpu.get("stdout", "").strip(), "onnxruntime": probe.get("result", probe)}


def tokens(device: str, samplings: dict[str, list[str]], bundle: list[str]) -> dict:
    """`speed reference` on the device and on the CPU, each sampling plain and speculative: the same tokens?"""
    report = {}
    for name, sampling in samplings.items():
        runs = {}
        for where in dict.fromkeys((device, "cpu")):
            for mode in ("plain", "speculative"):
                flags = ["--speculate"] if mode == "speculative" else []
                runs[f"{mode}_{where}"] = speed("reference", *bundle, "--device", where, "--json", "--max-new-tokens",
                                                "64", *flags, *sampling, PROMPT, timeout_s=120)
        ids = {key: outcome.get("result", {}).get("token_ids") for key, outcome in runs.items()}
        report[name] = {"all_equal": None not in ids.values() and len({tuple(i) for i in ids.values()}) == 1,
                        "tokens_per_s": {key: outcome.get("result", {}).get("tokens_per_s") for key, outcome in
                                         runs.items()},
                        "failed": {key: outcome for key, outcome in runs.items() if outcome["rc"] != 0}}
    return report


def graph_capture(device: str) -> dict:
    """Whether the demo model's stage sessions on `device` were given CUDA graphs (ONNX Runtime refuses a graph
    it cannot capture, and the node then runs it without)."""
    return run([sys.executable, "-c", "import json; from runtime.core.bundle import load_bundle; "
                "from runtime.executor.onnx_stage_model import OnnxStageModel; "
                f"model = OnnxStageModel(load_bundle(), device={device!r}); "
                "print(json.dumps({'provider': model.provider, 'cuda_graphs': model.cuda_graphs}))"], 120)


def cluster_file(directory: Path, device: str) -> Path:
    """deploy/local.yaml with every node on `device`, on loopback ports free now: the file's own may be taken on a
    borrowed machine, or by a test's cluster where the test suite runs this check."""
    spec = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    del spec["coordinator"]["http_address"]  # the benchmark speaks gRPC only
    processes = [spec["coordinator"], *spec["nodes"]]
    for process, address in zip(processes, free_loopback_addresses(len(processes))):
        process["address"] = address
    for node in spec["nodes"]:
        node["device"] = device
    path = directory / f"local-{device}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def free_loopback_addresses(count: int) -> list[str]:
    """`count` loopback addresses on distinct ports, free now (bound together, so none is given twice)."""
    with contextlib.ExitStack() as held:
        probes = [held.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{probe.getsockname()[1]}" for probe in probes]


def check(device: str, wheels: Path | None, bundle: Path | None) -> dict:
    report: dict = {"device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if wheels is not None:
        report["install"] = install(wheels)
    report["machine"] = machine()
    print(f"machine: {report['machine']}", flush=True)
    try:
        import pytest  # noqa: F401
        report["tests"] = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py",
                               "tests/test_device_resident.py", "-m", "not training"], 240)
    except ImportError:
        report["tests"] = {"rc": None, "skipped": "pytest is not installed here"}
    print(f"tests: rc {report['tests']['rc']}", flush=True)
    report["tokens"] = tokens(device, SAMPLINGS, [])
    print(f"tokens equal: { {name: r['all_equal'] for name, r in report['tokens'].items()} }", flush=True)
    report["graph_capture"] = graph_capture(device)
    runs = {device: {}, "cpu": {}}  # the name of a run: its device's environment
    if device == "cuda":
        runs["cuda_without_cuda_graphs"] = {"SPEED_CUDA_GRAPHS": "0"}
    for bench in ("--reference", "--local"):
        for name, env in runs.items():
            key = f"bench_{bench.strip('-')}_{name}"
            report[key] = speed("bench", bench, "--device", "cpu" if name == "cpu" else device, "--repeats", "2",
                                "--json", timeout_s=150, env=env)
            print(f"{key}: rc {report[key]['rc']} in {report[key]['seconds']} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="speed-gpu-check-") as scratch:
        report["bench_cluster"] = speed("bench", str(cluster_file(Path(scratch), device)), "--repeats", "1", "--json",
                                        timeout_s=240, env={"SPEED_STATE_DIR": scratch})
    print(f"bench_cluster: rc {report['bench_cluster']['rc']} in {report['bench_cluster']['seconds']} s", flush=True)
    if bundle is not None:
        given = ["--bundle", str(bundle.resolve())]
        report["bundle"] = {"path": str(bundle), "tokens": tokens(device, {"greedy": []}, given)}
        for where in dict.fromkeys((device, "cpu")):
            report["bundle"][f"bench_reference_{where}"] = speed("bench", "--reference", *given, "--device", where,
                                                                 "--repeats", "1", "--json", timeout_s=150)
        print(f"bundle: tokens equal {report['bundle']['tokens']['greedy']['all_equal']}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the report (default gpu-check.json)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--wheels", type=Path, help="install onnxruntime-gpu and the requirements from wheels here")
    parser.add_argument("--bundle", type=Path, help="also check this bundle's tokens and speed (e.g. SmolLM2's)")
    args = parser.parse_args()
    report = check(args.device, args.wheels, args.bundle)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
