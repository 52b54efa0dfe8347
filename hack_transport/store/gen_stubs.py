"""Generate the Python stubs of a .proto in proto/ into hack_transport/proto/ (grpcio-tools).

The stubs are committed; tests/store/test_store_stubs.py regenerates them and fails if they differ.
Run `python -m hack_transport.store.gen_stubs` after editing proto/hack_kv_store.proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "hack_transport/proto"


def generate(name: str, out_root: Path, proto_dir: Path = REPO / "proto") -> list[Path]:
    """Write <name>_pb2.py and <name>_pb2_grpc.py under out_root/hack_transport/proto.

    proto_dir is mapped to the package path, so the stubs import each other as
    `from hack_transport.proto import ...` and work from the installed package.
    """
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{PACKAGE}={proto_dir}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{PACKAGE}/{name}.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_dir / name}.proto")
    out = out_root / PACKAGE
    return [out / f"{name}{s}" for s in ("_pb2.py", "_pb2_grpc.py")]


if __name__ == "__main__":
    for f in generate(sys.argv[1] if len(sys.argv) > 1 else "hack_kv_store", REPO):
        print(f)
