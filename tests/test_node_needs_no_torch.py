"""Nodes run without torch: decoding a bundle with ONNX Runtime must not import it."""

import subprocess
import sys

PROGRAM = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
from runtime.cli import main
sys.exit(main(["reference", "--bundle", sys.argv[1], "--max-new-tokens", "4", "--json", "Hello"]))
"""


def test_onnx_reference_decoding_imports_no_torch(tiny_bundle):
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(tiny_bundle)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"token_ids"' in result.stdout
