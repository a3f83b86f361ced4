"""Generate the Python stubs of proto/speed/v1/speed.proto into runtime/wire: `python -m runtime.wire.codegen`.

protoc writes `from speed.v1 import speed_pb2`, an import of a top-level package that does not exist
here; the stubs live inside this package, so the import is made relative.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTO_FILE = PROTO_DIR / "speed" / "v1" / "speed.proto"
WIRE_DIR = Path(__file__).resolve().parent
GENERATED = ("speed_pb2.py", "speed_pb2.pyi", "speed_pb2_grpc.py")


def generate() -> dict[str, str]:
    """File name -> contents of the generated stubs."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        status = protoc.main([
            "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}", str(PROTO_FILE),
        ])
        if status != 0:
            raise SystemExit(f"protoc failed on {PROTO_FILE}")
        out = Path(tmp) / "speed" / "v1"
        files = {name: (out / name).read_text() for name in GENERATED}
    grpc_stub = files["speed_pb2_grpc.py"]
    files["speed_pb2_grpc.py"] = grpc_stub.replace("from speed.v1 import speed_pb2", "from . import speed_pb2")
    return files


def main() -> None:
    for name, text in generate().items():
        (WIRE_DIR / name).write_text(text)
    print(f"wrote {', '.join(GENERATED)} to {WIRE_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main()
