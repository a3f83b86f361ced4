"""Nodes run without torch: decoding a bundle with ONNX Runtime must not import it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.cluster  # its tests run the speed command and export in processes of their own

PROGRAM = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
from runtime.cli.main import main
sys.exit(main(["reference", "--bundle", sys.argv[1], "--max-new-tokens", "4", "--json", "Hello"]))
"""


def test_onnx_reference_decoding_imports_no_torch(tiny_bundle):
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(tiny_bundle)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"token_ids"' in result.stdout


EXPORT_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from runtime.cli.main import main
sys.exit(main(["export", sys.argv[1], sys.argv[2]]))
"""


def test_training_commands_without_torch_say_what_to_install(tmp_path):
    result = subprocess.run([sys.executable, "-c", EXPORT_WITHOUT_TORCH, str(tmp_path / "c.pt"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "needs torch, part of the training extra" in result.stderr
    assert not (tmp_path / "out").exists()
