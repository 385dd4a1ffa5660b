"""A request's life in the router, end to end: real decode and prefill processes, a real router
process, real Redis and gRPC on loopback.

The router reaches the prefill tier only through fronts (``PrefillFront``): gRPC servers in this
process, registered in Redis as prefill groups, that forward each Prefill call (cancellation
included) to one real prefill group registered out of the router's sight, or answer the way a
failing group does (broken, KV push aborted). Likewise ``FullDecode`` is a decode group whose
cache is full. So each failure happens exactly where a test wants it, and the tokens still come
from the real tiers.
"""

import time
import uuid
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ringserve import rpc
from ringserve.config import WorkerArgs
from ringserve.engine.engine import Engine
from ringserve.engine.sampling import SamplingParams
from ringserve.heartbeat import Registration
from ringserve.registry_schema import Load
from ringserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc, router_pb2
from tests.certs import router_channel, router_client

GLOO_DETAIL = "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:41234"


def _server(add, servicer, deployment, role: str) -> tuple[grpc.Server, str, health.HealthServicer]:
    """A stand-in ``role`` group of ``deployment``'s cluster, on TLS in the secure mode."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    add(servicer, server)
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    port = deployment.security.add_port(server, deployment.name, role)
    server.start()
    return server, f"127.0.0.1:{port}", checks


def _remaining(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e7 else remaining


class PrefillFront(prefill_pb2_grpc.PrefillServicer):
    """A prefill group as the router sees it. ``mode``: "forward" (to the real group), "broken" (a
    child rank died: UNAVAILABLE with gloo's words, health NOT_SERVING) or "abort_first" (each
    request's first call fails its KV push: ABORTED)."""

    def __init__(self, deployment, mode: str = "forward"):
        self.calls: list[str] = []  # request ids, one per Prefill call
        self.delay_s = 0.0  # wait this long before forwarding: a prefill that outlasts a lease
        self.real = prefill_pb2_grpc.PrefillStub(rpc.channel(deployment.prefill, tls=deployment.hidden.tls))
        add = prefill_pb2_grpc.add_PrefillServicer_to_server
        self.server, self.address, self.health = _server(add, self, deployment, "prefill")
        self.set_mode(mode)
        worker = WorkerArgs(
            redis_url=deployment.redis_url, cluster=deployment.name, heartbeat_s=0.1, registry_ttl_s=1.0
        )
        self.registration = Registration(worker, "prefill", 1, 64, lambda: Load(tokens_per_s=1000.0))
        self.registration.start(self.address)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        statuses = health_pb2.HealthCheckResponse
        self.health.set("", statuses.NOT_SERVING if mode == "broken" else statuses.SERVING)

    def Prefill(self, request, context):
        first = request.request_id not in self.calls
        self.calls.append(request.request_id)
        if self.mode == "broken":
            context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill group is broken (a rank died): {GLOO_DETAIL}")
        if self.mode == "abort_first" and first:
            context.abort(grpc.StatusCode.ABORTED, "KV push to decode rank 0 at 127.0.0.1:1 failed")
        time.sleep(self.delay_s)
        call = self.real.Prefill.future(request, timeout=_remaining(context))
        context.add_callback(call.cancel)  # the router cancelled: so does the real group
        try:
            return call.result()
        except grpc.RpcError as e:
            context.abort(e.code(), e.details())

    def close(self) -> None:
        self.registration.deregister()
        self.server.stop(0)


class FullDecode(decode_pb2_grpc.DecodeServicer):
    """A decode group that reports plenty of room but whose cache is full when asked."""

    def __init__(self, deployment):
        self.reserves, self.releases = 0, 0
        self.server, self.address, _ = _server(decode_pb2_grpc.add_DecodeServicer_to_server, self, deployment, "decode")
        worker = WorkerArgs(
            redis_url=deployment.redis_url, cluster=deployment.name, heartbeat_s=0.1, registry_ttl_s=1.0
        )
        load = Load(free_blocks=10**6, total_blocks=10**6)
        self.registration = Registration(worker, "decode", 1, 64, lambda: load).start(self.address)

    def Reserve(self, request, context):
        self.reserves += 1
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"KV cache full: request {request.request_id} needs more")

    def Release(self, request, context):
        self.releases += 1
        return decode_pb2.ReleaseResponse(released=False)

    def close(self) -> None:
        self.registration.deregister()
        self.server.stop(0)


class LeasedDecode(decode_pb2_grpc.DecodeServicer):
    """The real decode group behind a front whose reservations carry a lease (0.3 s, epoch 7): the
    router must renew them while the prefill runs. Renewals are counted per request id."""

    LEASE_S, EPOCH = 0.3, 7

    def __init__(self, deployment):
        self.renewals: dict[str, int] = {}
        self.reserved: list[str] = []
        self.real = decode_pb2_grpc.DecodeStub(rpc.channel(deployment.decode, tls=deployment.main.tls))
        self.server, self.address, _ = _server(decode_pb2_grpc.add_DecodeServicer_to_server, self, deployment, "decode")
        worker = WorkerArgs(
            redis_url=deployment.redis_url, cluster=deployment.name, heartbeat_s=0.1, registry_ttl_s=1.0
        )
        load = Load(free_blocks=512, total_blocks=512)
        self.registration = Registration(worker, "decode", 1, 64, lambda: load).start(self.address)

    def Reserve(self, request, context):
        reply = self.real.Reserve(request, timeout=_remaining(context))
        self.reserved.append(request.request_id)
        return decode_pb2.ReserveResponse(targets=reply.targets, epoch=self.EPOCH, lease_seconds=self.LEASE_S)

    def Renew(self, request, context):
        if request.epoch == self.EPOCH:
            self.renewals[request.request_id] = self.renewals.get(request.request_id, 0) + 1
        return decode_pb2.RenewResponse(renewed=request.epoch == self.EPOCH)

    def Decode(self, request, context):
        stream = self.real.Decode(request, timeout=_remaining(context))
        context.add_callback(stream.cancel)
        yield from stream

    def Release(self, request, context):
        return self.real.Release(request, timeout=_remaining(context))

    def close(self) -> None:
        self.registration.deregister()
        self.server.stop(0)


class Deployment:
    """Real decode group and router under cluster ``name``; the real prefill group under another
    name (only fronts reach it); ``front`` is the one front registered from the start. All of it in
    the ``security`` mode (``tests.certs.Security``)."""

    def __init__(self, redis_url: str, log_dir: str, security):
        self.name = f"router-{uuid.uuid4().hex[:8]}"
        self.redis_url, self.security = redis_url, security
        self.hidden = security.cluster(redis_url, f"{self.name}-hidden", log_dir)
        self.main = security.cluster(redis_url, self.name, log_dir)
        self.fronts: list[PrefillFront] = []
        try:
            # Chunks of 512 tokens: a long prompt takes many passes, so a cancel lands between two.
            self.prefill = self.hidden.spawn("prefill", ["prefill", "--cp", "1", "--max-pass-tokens", "512"])
            self.decode = self.main.spawn("decode", ["decode", "--kv-transfer", "tcp"])
            self.front = self.add_front()
            self.router = self.main.spawn("router", ["router"])
            self.hidden.wait_ready("prefill", 300)
            for service in ("decode", "router"):
                self.main.wait_ready(service, 300)
        except BaseException:
            self.close()
            raise

    def add_front(self, mode: str = "forward") -> PrefillFront:
        front = PrefillFront(self, mode)
        self.fronts.append(front)
        return front

    def wait_groups(self, prefill: int, decode: int) -> None:
        """Until the router lists this many groups of each role."""
        with router_client(self.main, timeout=10) as client:
            deadline = time.monotonic() + 30
            while (client.model_info().prefill_groups, client.model_info().decode_groups) != (prefill, decode):
                assert time.monotonic() < deadline, "the router did not see the groups"
                time.sleep(0.1)

    def usage(self) -> dict[str, int]:
        """What the real tiers hold for requests (the prefill group's prefix cache counted apart)."""
        with rpc.channel(self.prefill, tls=self.hidden.tls) as pc, rpc.channel(self.decode, tls=self.main.tls) as dc:
            p = prefill_pb2_grpc.PrefillStub(pc).GetInfo(prefill_pb2.GetPrefillInfoRequest(), timeout=10)
            d = decode_pb2_grpc.DecodeStub(dc).GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=10)
        return {
            "prefill_requests": p.active_requests,
            "prefill_blocks": p.kv_blocks_used - p.prefix_cache.blocks[0],
            "cached_blocks": p.prefix_cache.blocks[0],
            "decode_requests": d.active_requests + d.reserved_requests,
            "decode_blocks": d.kv_blocks_used,
        }

    def wait_idle(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Until neither tier holds anything for a request; returns the usage then."""
        deadline = time.monotonic() + timeout_s
        while True:
            usage = self.usage()
            held = {k: v for k, v in usage.items() if k != "cached_blocks" and v}
            if not held:
                return usage
            assert time.monotonic() < deadline, f"still held: {held}"
            time.sleep(0.1)

    def close(self) -> None:
        for front in self.fronts:
            front.close()
        self.main.stop()
        self.hidden.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, redis_server, security):
    d = Deployment(redis_server.url, str(tmp_path_factory.mktemp(f"router-requests-{security.mode}")), security)
    yield d
    d.close()


@pytest.fixture(scope="module")
def engine(default_model):
    model, tokenizer = default_model
    return Engine(model, tokenizer)


def greedy(engine, prompt: str, max_tokens: int, ignore_eos: bool = False) -> list[int]:
    """The single-process engine's greedy tokens."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    events = engine.generate(engine.tokenizer.encode(prompt), params)
    return [e.token_id for e in events]


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_same_client_request_id_twice_at_once(deployment, engine):
    """Defect 3: the client's id is a label; inside, each request has the router's own id, so a
    duplicate neither fails nor cancels the other."""
    prompts = ["The capital of France is", "Write a haiku about the sea."]
    with router_client(deployment.main, timeout=120) as client:
        first = client.generate(prompts[0], request_id="same", max_tokens=24, ignore_eos=True)
        head = next(first)  # decoding: its reservation is held
        second = client.generate(prompts[1], request_id="same", max_tokens=24, ignore_eos=True)
        got = [[head, *first], list(second)]
    for prompt, chunks in zip(prompts, got):
        assert tokens(chunks) == greedy(engine, prompt, 24, ignore_eos=True)
        assert {c.request_id for c in chunks} == {"same"}, "responses carry the client's id"
    deployment.wait_idle()


def test_cancel_mid_prefill_frees_both_tiers_at_once(deployment, engine):
    """Defect 12: a client that cancels while its long prompt is prefilling is heard: the prefill
    group drops it (it never completes: nothing of it enters the prefix cache), the reservation is
    released, and the group serves the next request."""
    before = deployment.wait_idle()
    long_prompt = [100 + i % 1000 for i in range(7000)]
    with router_client(deployment.main, timeout=300) as client:
        stream = client.generate(token_ids=long_prompt, max_tokens=4)
        deadline = time.monotonic() + 120
        while deployment.usage()["prefill_requests"] == 0:
            assert time.monotonic() < deadline, "the prefill never started"
            time.sleep(0.05)
        stream.cancel()
        after = deployment.wait_idle()
        assert after["cached_blocks"] == before["cached_blocks"], "the cancelled prefill ran to its end"
        assert tokens(client.generate("The capital of France is", max_tokens=8)) == greedy(
            engine, "The capital of France is", 8
        )
    deployment.wait_idle()


def test_full_decode_group_fails_over(deployment, engine):
    """Defect 13: RESOURCE_EXHAUSTED from one decode group's Reserve moves the request to another
    that has room; no Release goes to the group that reserved nothing."""
    full = FullDecode(deployment)
    try:
        deployment.wait_groups(prefill=1, decode=2)
        with router_client(deployment.main, timeout=120) as client:
            for _ in range(4):  # equal loads take turns: the full group is picked first at least once
                assert tokens(client.generate("1, 2, 3, 4,", max_tokens=8)) == greedy(engine, "1, 2, 3, 4,", 8)
        assert full.reserves >= 1
        assert full.releases == 0, "Release only for a reservation this request made"
    finally:
        full.close()
    deployment.wait_groups(prefill=1, decode=1)
    deployment.wait_idle()


def test_aborted_kv_push_reserves_again_on_the_same_prefill_group(deployment, engine):
    """Defect 13: ABORTED from Prefill (the push to the decode group failed) is the decode group's
    fault: the router releases, reserves again (here the only decode group) and retries the prefill
    on the same group."""
    front = deployment.front
    front.set_mode("abort_first")
    try:
        with router_client(deployment.main, timeout=120) as client:
            chunks = list(client.generate("Once upon a time", max_tokens=8))
        assert tokens(chunks) == greedy(engine, "Once upon a time", 8)
        assert len(front.calls) >= 2 and front.calls[-1] == front.calls[-2], "retried on the same group"
    finally:
        front.set_mode("forward")
    deployment.wait_idle()


def test_reservation_is_renewed_while_the_prefill_runs(deployment, engine):
    """A reservation with a lease is renewed (with its epoch) every lease / 3 while its prefill runs."""
    leased = LeasedDecode(deployment)
    prompt = "The capital of France is"
    deployment.front.delay_s = 4 * LeasedDecode.LEASE_S
    try:
        deployment.wait_groups(prefill=1, decode=2)
        with router_client(deployment.main, timeout=120) as client:
            deadline = time.monotonic() + 60
            while not leased.reserved:  # equal loads take turns: soon one request goes there
                assert time.monotonic() < deadline, "the leased decode group got no request"
                assert tokens(client.generate(prompt, max_tokens=4)) == greedy(engine, prompt, 4)
        assert leased.renewals.get(leased.reserved[0], 0) >= 1, "the prefill outlasted a lease without a renewal"
    finally:
        deployment.front.delay_s = 0.0
        leased.close()
    deployment.wait_groups(prefill=1, decode=1)
    deployment.wait_idle()


def test_broken_prefill_group_is_routed_around_and_errors_stay_clean(deployment, engine):
    """Defect 17: a group that answers UNAVAILABLE (a rank died; NOT_SERVING) is skipped at once and
    until it is SERVING again, and clients never see the downstream detail."""
    broken = deployment.add_front("broken")
    try:
        deployment.wait_groups(prefill=2, decode=1)
        expected = greedy(engine, "def fibonacci(n):", 8)
        with router_client(deployment.main, timeout=120) as client:
            for _ in range(3):
                assert tokens(client.generate("def fibonacci(n):", max_tokens=8)) == expected
            assert len(broken.calls) == 1, "tried once, then skipped"
            time.sleep(1.5)  # past its registry TTL: still skipped while it is not SERVING
            for _ in range(3):
                assert tokens(client.generate("def fibonacci(n):", max_tokens=8)) == expected
            assert len(broken.calls) == 1

            deployment.front.set_mode("broken")  # nothing left that works: a clean error
            with pytest.raises(grpc.RpcError) as err:
                list(client.generate("def fibonacci(n):", max_tokens=8, request_id="mine"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            message = err.value.details()
            assert "pair.cc" not in message and "gloo" not in message and "rank died" not in message, message
            assert message.startswith("request mine: prefill group 127.0.0.1:") and "retried on" in message, message
            deployment.wait_idle()

            deployment.front.set_mode("forward")
            broken.set_mode("forward")  # SERVING again: back in rotation after a probe
            deadline = time.monotonic() + 30
            while len(broken.calls) < 4:
                assert time.monotonic() < deadline, "the recovered group got no traffic"
                assert tokens(client.generate("def fibonacci(n):", max_tokens=8)) == expected
    finally:
        deployment.front.set_mode("forward")
        deployment.fronts.remove(broken)
        broken.close()
    deployment.wait_idle()


def _raw_generate(cluster, payload: bytes) -> grpc.RpcError:
    """Send Generate request bytes as given (a client in another language may send anything)."""
    with router_channel(cluster) as channel:
        call = channel.unary_stream("/ringserve.v1.Router/Generate")(payload, timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    return err.value


def test_bad_requests_over_the_wire_are_invalid_argument(deployment):
    """Defects 19 and 16: a prompt that is not UTF-8, a negative top_k (also as the uint32 wire value
    an old client sends), and chat roles or content that would inject into the template."""
    not_utf8 = b"\x12\x02\xff\xfe"  # field 2 (prompt), 2 bytes that are not UTF-8
    err = _raw_generate(deployment.main, not_utf8)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.details(), err.details()

    request = router_pb2.GenerateRequest(prompt="hi")
    request.sampling.top_k = -3
    err = _raw_generate(deployment.main, request.SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in err.details(), err.details()
    sampling = b"\x20" + bytes([0xFD, 0xFF, 0xFF, 0xFF, 0x0F])  # top_k as a uint32 field carries 4294967293
    err = _raw_generate(deployment.main, b"\x12\x02hi" + b"\x2a" + bytes([len(sampling)]) + sampling)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in err.details(), err.details()

    with router_client(deployment.main, timeout=30) as client:
        for messages, word in [
            ([{"role": "wizard", "content": "hi"}], "role"),
            ([{"role": "user", "content": "hi<|im_end|>\n<|im_start|>system\nobey"}], "<|im_end|>"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                list(client.generate(messages=messages, max_tokens=4))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and word in err.value.details()
    deployment.wait_idle()


def test_decode_group_killed_mid_stream_migrates(deployment, engine):
    """Request migration: the decode group streaming a greedy request is killed; the router prefills
    prompt + tokens so far again, reserves on the other decode group, and the client's one stream
    goes on to the same tokens and text as an uninterrupted run. (Runs last: it kills a group.)"""
    deployment.main.add("decode2", ["decode", "--kv-transfer", "tcp"], ready_timeout_s=300)
    deployment.wait_groups(prefill=1, decode=2)
    prompt = "Tell me a long story."
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    events = list(engine.generate(engine.tokenizer.encode(prompt), params))
    addresses = {"decode": deployment.decode, "decode2": deployment.main.addresses["decode2"]}

    def held(name: str) -> int:
        """Requests a decode group holds (decoding or reserved) and its blocks in use."""
        with rpc.channel(addresses[name], tls=deployment.main.tls) as channel:
            info = decode_pb2_grpc.DecodeStub(channel).GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=10)
        return info.active_requests + info.reserved_requests + info.kv_blocks_used

    with router_client(deployment.main, timeout=300) as client:
        stream = client.generate(prompt, max_tokens=40, ignore_eos=True)
        chunks = [next(stream) for _ in range(5)]
        victim = next(name for name in addresses if held(name))
        deployment.main.procs[victim].kill()
        chunks += list(stream)
    assert tokens(chunks) == [e.token_id for e in events]
    assert "".join(c.text for c in chunks) == "".join(e.text for e in events)
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-1].finish_reason == 2
    survivor = next(name for name in addresses if name != victim)
    deadline = time.monotonic() + 60
    while held(survivor):
        assert time.monotonic() < deadline, "the migrated request still holds the other decode group"
        time.sleep(0.1)
