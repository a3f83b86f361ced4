"""Every ```python block of README.md runs as shown, each in a process of its own.

Blocks that use the client SDK talk to a demo cluster (the shipped model, three nodes, one stage each)
that this module starts on free loopback ports; they read its address from SPEED_COORDINATOR, whose
default in the README is the demo cluster's own, 127.0.0.1:50050. Nothing of a block is rewritten.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import running_cluster

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
BLOCK_TIMEOUT_S = 120


def readme_python_blocks() -> list[str]:
    return PYTHON_BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def needs_cluster(code: str) -> bool:
    return "runtime.client" in code


BLOCKS = readme_python_blocks()


def test_the_readme_has_python_snippets():
    assert len(BLOCKS) >= 2
    assert any(needs_cluster(code) for code in BLOCKS)
    assert any(not needs_cluster(code) for code in BLOCKS)


@pytest.fixture(scope="module")
def demo_cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("readme-cluster")) as cluster:
        yield cluster


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs_as_shown(code, request, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore"}
    env.pop("SPEED_COORDINATOR", None)
    if needs_cluster(code):
        env["SPEED_COORDINATOR"] = request.getfixturevalue("demo_cluster").endpoint
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "the snippet printed nothing"
