"""What every ringserve gRPC server does (rpc.start_server), over real gRPC on loopback: a bound on
long calls that leaves health and control calls answered, a port it refuses to share, message limits
for million-token prompts, Health.List, and reflection under v1 and v1alpha."""

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from ringserve import rpc
from ringserve.config import GrpcArgs
from ringserve.errors import FailedPrecondition
from ringserve.v1 import router_pb2, router_pb2_grpc

LIMIT = 3


class HeldStreams(router_pb2_grpc.RouterServicer):
    """Generate streams one chunk, then holds its server thread until ``release`` is set or the
    client goes away;
    Tokenize answers one id per 4 bytes of text (a large request, and a large answer)."""

    def __init__(self):
        self.release = threading.Event()

    def Generate(self, request, context):
        yield router_pb2.GenerateResponse(text="held")
        while context.is_active() and not self.release.wait(timeout=0.05):
            pass

    def Tokenize(self, request, context):
        return router_pb2.TokenizeResponse(token_ids=[i % 100 for i in range(len(request.text) // 4)])


@pytest.fixture
def server():
    servicer = HeldStreams()
    srv, port, health = rpc.start_server(
        [(router_pb2_grpc.add_RouterServicer_to_server, servicer)],
        ["ringserve.v1.Router"],
        "127.0.0.1",
        0,
        limits=GrpcArgs(max_concurrent_requests=LIMIT),
    )
    yield f"127.0.0.1:{port}", servicer, health
    servicer.release.set()
    srv.stop(grace=0)


def test_long_calls_are_bounded_and_health_still_answers(server):
    address, servicer, _ = server
    with rpc.channel(address) as ch:
        router, health = router_pb2_grpc.RouterStub(ch), health_pb2_grpc.HealthStub(ch)
        held = [router.Generate(router_pb2.GenerateRequest(), timeout=120) for _ in range(LIMIT)]
        for stream in held:  # each is running: it holds a server thread
            assert next(stream).text == "held"
        SERVING = health_pb2.HealthCheckResponse.SERVING
        for _ in range(3 * LIMIT):  # answered while the long calls hold their threads
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING
        with pytest.raises(grpc.RpcError) as refused:
            next(router.Generate(router_pb2.GenerateRequest(), timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent-requests" in refused.value.details()

        held[0].cancel()  # a client that goes away frees its place
        deadline = time.monotonic() + 30
        while True:
            replacement = router.Generate(router_pb2.GenerateRequest(), timeout=120)
            try:
                assert next(replacement).text == "held"
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)

        servicer.release.set()
        for stream in [*held[1:], replacement]:
            assert list(stream) == []  # ended cleanly
        servicer.release.clear()
        again = [router.Generate(router_pb2.GenerateRequest(), timeout=120) for _ in range(LIMIT)]
        assert [next(s).text for s in again] == ["held"] * LIMIT  # all places free again
        servicer.release.set()


def test_a_port_in_use_is_refused(server):
    address, _, _ = server
    port = int(address.rsplit(":", 1)[1])
    with pytest.raises(FailedPrecondition, match="in use"):
        rpc.start_server([], ["ringserve.v1.Router"], "127.0.0.1", port)


def test_messages_over_grpc_default_pass_both_ways(server):
    address, _, _ = server
    text = "x" * (20 * 1024 * 1024)  # 20 MiB: five times gRPC's default limit; the answer 5 MiB
    with rpc.channel(address) as ch:
        reply = router_pb2_grpc.RouterStub(ch).Tokenize(router_pb2.TokenizeRequest(text=text), timeout=60)
    assert len(reply.token_ids) == len(text) // 4


def test_health_list_names_every_status(server):
    address, _, health = server
    health.set(rpc.READY, health_pb2.HealthCheckResponse.NOT_SERVING)
    with rpc.channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=30)
    statuses = {name: s.status for name, s in reply.statuses.items()}
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses == {"": SERVING, "ringserve.v1.Router": SERVING, rpc.LIVE: SERVING, rpc.READY: NOT_SERVING}


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_v1_and_v1alpha(server, version):
    address, _, _ = server
    with rpc.channel(address) as ch:
        info = ch.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="ringserve.v1.Router"),
        ]
        listed, described = list(info(iter(requests), timeout=30))
    services = {s.name for s in listed.list_services_response.service}
    assert {"ringserve.v1.Router", "grpc.health.v1.Health", f"grpc.reflection.{version}.ServerReflection"} <= services
    assert described.file_descriptor_response.file_descriptor_proto  # the router's .proto, serialized
