"""The committed gRPC stubs are exactly what the .proto files generate."""

import subprocess
import sys
from pathlib import Path

from ringserve.protogen import ROOT


def test_stubs_are_up_to_date(tmp_path):
    # In a fresh process: grpc_tools' protoc extension segfaults in a process that has already
    # loaded NIXL's native libraries (as this test session does when it collects the NIXL tests).
    subprocess.run([sys.executable, "-m", "ringserve.protogen", str(tmp_path)], check=True, cwd=ROOT)
    fresh = sorted((tmp_path / "ringserve" / "v1").glob("*_pb2*.py*"))
    committed = sorted((ROOT / "ringserve" / "v1").glob("*_pb2*.py*"))
    assert [f.name for f in fresh] == [f.name for f in committed]
    stale = [f.name for f in fresh if f.read_bytes() != (ROOT / "ringserve" / "v1" / f.name).read_bytes()]
    assert not stale, f"stale stubs {stale}: run `python -m ringserve.protogen` and commit the result"


def test_every_service_is_versioned():
    for proto in (ROOT / "proto" / "ringserve" / "v1").glob("*.proto"):
        assert "package ringserve.v1;" in Path(proto).read_text()
