"""The tree is the architecture: imports point down the layers drawn in runtime/__init__.py, and the
processes load only what their layers allow."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_point_down_the_layers_with_no_cycles():
    # the contracts live in pyproject.toml: layers, what the coordinator, client, nodes and core may not
    # import, and no cycles between the modules of a package
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


LOADED_MODULES = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


@pytest.mark.parametrize("process, modules, absent", [
    ("coordinator", ["runtime.coordinator.server"], {"onnxruntime", "onnx", "torch", "nodes", "runtime.executor"}),
    ("client", ["runtime.client"], {"onnxruntime", "onnx", "torch", "nodes", "runtime.executor", "tokenizers"}),
    ("node", ["nodes.daemon"], {"torch", "onnx"}),
])
def test_a_process_loads_only_what_its_layer_needs(process, modules, absent):
    result = subprocess.run([sys.executable, "-c", LOADED_MODULES, *modules], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert not loaded & absent, f"a {process} process loads {sorted(loaded & absent)}"
