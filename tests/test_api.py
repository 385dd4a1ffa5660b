"""The committed gRPC stubs are exactly what the .proto files generate."""

from pathlib import Path

from ringserve.protogen import ROOT, generate


def test_stubs_are_up_to_date(tmp_path):
    fresh = generate(tmp_path)
    committed = sorted((ROOT / "ringserve" / "v1").glob("*_pb2*.py*"))
    assert [f.name for f in fresh] == [f.name for f in committed]
    stale = [f.name for f in fresh if f.read_bytes() != (ROOT / "ringserve" / "v1" / f.name).read_bytes()]
    assert not stale, f"stale stubs {stale}: run `python -m ringserve.protogen` and commit the result"


def test_every_service_is_versioned():
    for proto in (ROOT / "proto" / "ringserve" / "v1").glob("*.proto"):
        assert "package ringserve.v1;" in Path(proto).read_text()
