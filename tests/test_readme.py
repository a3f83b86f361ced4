"""Every ```python and ```bash block of README.md runs as shown, each in a process of its own (the
command tours are ```sh blocks, which are not run).

Blocks that use the client SDK, the OpenAI-compatible API or curl talk to a demo cluster (the shipped
model, three nodes, one stage each) started on free loopback ports; they read its addresses from
SPEED_COORDINATOR and SPEED_API, whose defaults in the README are deploy/local.yaml's, 127.0.0.1:50050
and http://127.0.0.1:50080. Nothing of a block is rewritten.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
BLOCK_TIMEOUT_S = 120


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every block that runs."""
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def needs_cluster(code: str) -> bool:
    return any(word in code for word in ("runtime.client", "openai", "SPEED_API"))


BLOCKS = readme_blocks()


def test_the_readme_has_python_snippets_and_curl_examples():
    assert len(BLOCKS) >= 4
    assert any(needs_cluster(code) for _, code in BLOCKS)
    assert any(not needs_cluster(code) for _, code in BLOCKS)
    assert any(language == "bash" and "curl" in code for language, code in BLOCKS)


@pytest.mark.parametrize(("language", "code"), BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_block_runs_as_shown(language, code, request, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore", "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    env.pop("SPEED_COORDINATOR", None)
    env.pop("SPEED_API", None)
    if needs_cluster(code):
        cluster = request.getfixturevalue("serving_cluster")
        env["SPEED_COORDINATOR"], env["SPEED_API"] = cluster.endpoint, cluster.http_url
    script = tmp_path / ("snippet.py" if language == "python" else "snippet.sh")
    script.write_text(code, encoding="utf-8")
    command = [sys.executable, str(script)] if language == "python" else ["bash", "-euo", "pipefail", str(script)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "the snippet printed nothing"
