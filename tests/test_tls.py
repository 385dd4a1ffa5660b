"""Transport security over real TLS gRPC servers on loopback, with certificates made here."""

import argparse
import asyncio
import dataclasses
import os
import shutil

import grpc
import pytest

from ringserve import rpc
from ringserve.config import DecodeConfig, RouterConfig
from ringserve.errors import FailedPrecondition, InvalidArgument
from ringserve.tls import ChannelTls
from ringserve.v1 import decode_pb2, decode_pb2_grpc
from tests.certs import CA


class InfoOnly(decode_pb2_grpc.DecodeServicer):
    """A Decode API that answers GetInfo: enough to see who gets through."""

    calls = 0

    def GetInfo(self, request, context):
        InfoOnly.calls += 1
        return decode_pb2.GetDecodeInfoResponse(transport="tcp")


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path / "ca")
    return {
        "ca": ca,
        "decode": ca.issue("decode", role="decode"),
        "router": ca.issue("router", role="router"),
        "prefill": ca.issue("prefill", role="prefill"),
        "other_ca": CA(tmp_path / "other", name="another-deployment"),
    }


def _decode_server(issued, host="127.0.0.1"):
    cfg = DecodeConfig(tls_cert=issued.cert, tls_key=issued.key, tls_ca=issued.ca)
    add = decode_pb2_grpc.add_DecodeServicer_to_server
    server, port, _ = rpc.start_server([(add, InfoOnly())], ["ringserve.v1.Decode"], host, 0, limits=cfg)
    return server, port


def _get_info(address: str, tls: ChannelTls | None):
    with rpc.channel(address, tls=tls) as ch:
        return decode_pb2_grpc.DecodeStub(ch).GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=10)


def _as_client(issued) -> ChannelTls:
    return ChannelTls(issued.ca, issued.cert, issued.key)


def test_router_role_gets_through_and_others_are_refused(pki):
    """mTLS: the router's certificate is served; a prefill's certificate of the same CA passes the
    handshake but not the role check; a channel with no client certificate fails the handshake."""
    server, port = _decode_server(pki["decode"])
    address = f"127.0.0.1:{port}"
    try:
        before = InfoOnly.calls
        assert _get_info(address, _as_client(pki["router"])).transport == "tcp"
        with pytest.raises(grpc.RpcError) as e:
            _get_info(address, _as_client(pki["prefill"]))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only from router" in e.value.details() and "/prefill" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            _get_info(address, ChannelTls(pki["ca"].path))  # verifies the server, shows no certificate
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert InfoOnly.calls == before + 1
    finally:
        server.stop(None)


def test_plaintext_client_to_a_tls_port_fails(pki):
    server, port = _decode_server(pki["decode"])
    try:
        with pytest.raises(grpc.RpcError) as e:
            _get_info(f"127.0.0.1:{port}", None)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_another_deployments_certificates_are_refused_both_ways(pki):
    """A client with a router certificate of another CA is refused at the handshake, and so is a
    server whose certificate another CA signed (the router would not send it traffic)."""
    other = pki["other_ca"]
    server, port = _decode_server(pki["decode"])
    try:
        foreign_router = other.issue("router", role="router")
        with pytest.raises(grpc.RpcError) as e:
            _get_info(f"127.0.0.1:{port}", ChannelTls(pki["ca"].path, foreign_router.cert, foreign_router.key))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)
    foreign_decode = other.issue("decode", role="decode")
    server, port = _decode_server(dataclasses.replace(foreign_decode, ca=pki["ca"].path))
    try:
        with pytest.raises(grpc.RpcError) as e:
            _get_info(f"127.0.0.1:{port}", _as_client(pki["router"]))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_an_address_its_certificate_does_not_name_is_refused(pki):
    """Hostname verification: a server whose certificate names only another host cannot be
    reached at 127.0.0.1, though its CA is right; at a name it has, it can."""
    elsewhere = pki["ca"].issue("decode-elsewhere", role="decode", hosts=("localhost",))
    server, port = _decode_server(elsewhere)
    try:
        with pytest.raises(grpc.RpcError) as e:
            _get_info(f"127.0.0.1:{port}", _as_client(pki["router"]))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _get_info(f"localhost:{port}", _as_client(pki["router"])).transport == "tcp"
    finally:
        server.stop(None)


def test_server_certificate_rotation_needs_no_restart(pki, tmp_path):
    """The files behind --tls-cert/--tls-key are replaced by ones of a new CA: new handshakes use them."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(pki["decode"].cert, cert)
    shutil.copy(pki["decode"].key, key)
    server, port = _decode_server(dataclasses.replace(pki["decode"], cert=str(cert), key=str(key)))
    try:
        assert _get_info(f"127.0.0.1:{port}", _as_client(pki["router"])).transport == "tcp"
        rotated = pki["ca"].issue("decode-rotated", role="decode", hosts=("localhost",))
        shutil.copy(rotated.key, key)
        shutil.copy(rotated.cert, cert)
        # The rotated certificate names only localhost: a new connection to 127.0.0.1 now fails.
        with pytest.raises(grpc.RpcError):
            _get_info(f"127.0.0.1:{port}", _as_client(pki["router"]))
        assert _get_info(f"localhost:{port}", _as_client(pki["router"])).transport == "tcp"
    finally:
        server.stop(None)


def _rotate(issued, cert, key) -> None:
    """Replace the files at ``cert`` and ``key`` by ``issued``'s as a rotation does: new files renamed over the old."""
    for source, target in ((issued.key, key), (issued.cert, cert)):
        shutil.copy(source, f"{target}.new")
        os.replace(f"{target}.new", target)


def test_client_certificate_rotation_needs_no_new_channel(pki, tmp_path):
    """A long-lived channel (the router keeps one per group) whose client certificate files are
    rotated makes its next call with the new certificate: a prefill role's certificate is refused by
    Decode, and the router's one that replaces it on disk gets through on the same channel and stub,
    without a restart; Client and AsyncClient channels do the same."""
    server, port = _decode_server(pki["decode"])
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    _rotate(pki["prefill"], cert, key)
    tls = ChannelTls(pki["ca"].path, str(cert), str(key))
    request = decode_pb2.GetDecodeInfoRequest()
    try:
        with rpc.channel(f"127.0.0.1:{port}", tls=tls) as ch:
            stub = decode_pb2_grpc.DecodeStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.GetInfo(request, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "/prefill" in e.value.details()
            _rotate(pki["router"], cert, key)
            assert stub.GetInfo(request, timeout=10).transport == "tcp"
            assert stub.GetInfo.future(request, timeout=10).result().transport == "tcp"
            _rotate(pki["prefill"], cert, key)  # and back: the next call is refused again
            with pytest.raises(grpc.RpcError) as e:
                stub.GetInfo.with_call(request, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

        async def aio_calls() -> list[str]:
            async with rpc.aio_channel(f"127.0.0.1:{port}", tls=tls) as ch:
                stub, answers = decode_pb2_grpc.DecodeStub(ch), []
                for issued in (pki["prefill"], pki["router"]):
                    _rotate(issued, cert, key)
                    try:
                        answers.append((await stub.GetInfo(request, timeout=10)).transport)
                    except grpc.aio.AioRpcError as e:
                        answers.append(e.code().name)
                return answers

        assert asyncio.run(aio_calls()) == ["PERMISSION_DENIED", "tcp"]
    finally:
        server.stop(None)


def test_plaintext_on_a_network_address_needs_insecure(caplog):
    """Without TLS, a non-loopback bind is refused unless --insecure, which is logged."""
    add = decode_pb2_grpc.add_DecodeServicer_to_server
    with pytest.raises(FailedPrecondition, match="without TLS.*--insecure"):
        rpc.start_server([(add, InfoOnly())], ["ringserve.v1.Decode"], "0.0.0.0", 0, limits=DecodeConfig())
    server, _, _ = rpc.start_server(
        [(add, InfoOnly())], ["ringserve.v1.Decode"], "0.0.0.0", 0, limits=DecodeConfig(insecure=True)
    )
    server.stop(None)
    assert "WITHOUT TLS (--insecure)" in caplog.text
    with pytest.raises(Exception, match="all of --tls-cert, --tls-key and --tls-ca"):
        rpc.start_server([(add, InfoOnly())], ["ringserve.v1.Decode"], "::1", 0, limits=RouterConfig(tls_cert="x"))


def test_up_off_loopback_needs_insecure(redis_server):
    """`ringserve up` serves plaintext: a network --host is refused before any child starts, unless --insecure."""
    from ringserve.supervise import check_flags

    flags = dict(cp=1, kvp=1, tp=1, dtype="float32", model=None, port=0, http_port=0, redis_url=redis_server.url)
    flags |= dict(gpu_memory_fraction=0.9, prefill_args="", decode_args="", router_args="")
    flags["redis_port"] = 0
    with pytest.raises(InvalidArgument, match="add --insecure"):
        check_flags(argparse.Namespace(**flags, host="0.0.0.0", insecure=False))
    check_flags(argparse.Namespace(**flags, host="0.0.0.0", insecure=True))
    check_flags(argparse.Namespace(**flags, host="127.0.0.1", insecure=False))


def test_health_command_probes_a_mutual_tls_port(pki, monkeypatch, capsys):
    """`ringserve health` (the chart's exec probe under TLS) checks health with the service's own certificate."""
    from ringserve.cli import main

    server, port = _decode_server(pki["decode"])
    try:
        assert main(["health", "--port", str(port)]) == 1  # no TLS settings: the handshake fails
        for var, value in zip(("CERT", "KEY", "CA"), (pki["prefill"].cert, pki["prefill"].key, pki["ca"].path)):
            monkeypatch.setenv(f"RINGSERVE_TLS_{var}", value)
        assert main(["health", "--port", str(port)]) == 0
        assert main(["health", "--port", str(port), "--service", "ringserve.unknown"]) == 1
        assert "SERVING" in capsys.readouterr().out
    finally:
        server.stop(None)
