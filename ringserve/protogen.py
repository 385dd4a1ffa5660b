"""Generate the gRPC stubs in ringserve/v1/ from proto/ringserve/v1/*.proto.

Run ``python -m ringserve.protogen`` after editing a .proto file; tests/test_api.py fails when
the committed stubs differ from what this produces (the grpcio-tools version is pinned).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto under ``out_dir``/ringserve/v1."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "ringserve" / "v1").glob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    return sorted((out_dir / "ringserve" / "v1").glob("*.py*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT  # another directory: to compare, not to commit
    files = generate(out)
    print("\n".join(str(f.relative_to(out)) for f in files), file=sys.stderr)
