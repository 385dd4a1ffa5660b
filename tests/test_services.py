"""The disaggregated path end to end: real service processes, real gRPC on loopback."""

import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ringserve import rpc
from ringserve.client import Client
from ringserve.engine.engine import Engine
from ringserve.engine.sampling import SamplingParams
from ringserve.process_group import free_port
from ringserve.tls import ChannelTls
from ringserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.certs import API_KEY, CA, async_router_client, cli_generate, router_channel, router_client

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Once upon a time " * 40,  # 160 tokens: several blocks, every rank gets work
    "a",
]


@pytest.fixture(scope="module")
def clusters(tmp_path_factory, redis_server, security):
    """Clusters by (CP, KVP) size, started on first use and stopped at the end of the module, in the
    module's security mode (plain, then secure: conftest's ``security``); they share the session's
    Redis, each under its own cluster name. With KVP, requests spread over the decode ranks from 32
    tokens on, so the test prompts do. With CP=2, the prefill group runs prompts over 128 tokens in
    chunks and packs concurrent requests into shared passes. A secure router also serves the HTTPS
    API (``cluster.https_port``)."""
    started = {}

    def get(cp: int, kvp: int = 1, transport: str = "auto"):
        key = (cp, kvp, transport)
        if key not in started:
            flags = ["--kv-transfer", transport]
            # CP=2 runs prompts over 128 tokens in chunks, and packs concurrent ones.
            scheduling = ["--max-pass-tokens", "128"] if cp == 2 else []
            https_port = free_port()
            router = ["--http-port", str(https_port)] if security.secure else []
            extra = {"decode": ["--shard-tokens", "32", *flags], "prefill": [*flags, *scheduling], "router": router}
            started[key] = security.start_cluster(
                cp=cp,
                kvp=kvp,
                log_dir=str(tmp_path_factory.mktemp(f"cp{cp}-kvp{kvp}-{transport}-{security.mode}")),
                metrics=True,
                redis_url=redis_server.url,
                extra=extra,
            )
            started[key].https_port = https_port
        return started[key]

    yield get
    for c in started.values():
        c.stop()


secure_only = pytest.mark.parametrize("security", ["secure"], indirect=True)


def scrape(cluster, service: str, sample: str) -> float:
    """One sample of a service's /metrics (0 when absent)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{cluster.metrics[service]}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def engine(default_model):
    model, tokenizer = default_model
    return Engine(model, tokenizer)


_references: dict = {}


def reference(engine, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    """Greedy tokens and text of the single-process engine (computed once per prompt)."""
    key = (prompt, max_tokens)
    if key not in _references:
        events = list(engine.generate(engine.tokenizer.encode(prompt), SamplingParams(max_tokens=max_tokens)))
        _references[key] = [e.token_id for e in events], "".join(e.text for e in events)
    return _references[key]


def prefill_info(cluster):
    with rpc.channel(cluster.prefill, tls=cluster.tls) as channel:
        return prefill_pb2_grpc.PrefillStub(channel).GetInfo(prefill_pb2.GetPrefillInfoRequest(), timeout=10)


def blocks_used(cluster) -> tuple[int, int]:
    """KV blocks held for requests: on the prefill leader (beyond what its prefix cache keeps) and
    on the decode worker."""
    p = prefill_info(cluster)
    with rpc.channel(cluster.decode, tls=cluster.tls) as dc:
        d = decode_pb2_grpc.DecodeStub(dc).GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=10)
    return p.kv_blocks_used - p.prefix_cache.blocks[0], d.kv_blocks_used


def prefill_group_ids(cluster, redis_url: str) -> dict[str, str]:
    """The registry id of each of ``cluster``'s prefill groups, by address (what a router names in Reserve)."""
    from ringserve.config import RedisArgs
    from ringserve.registry import Registry, connect

    groups = Registry(connect(RedisArgs(redis_url=redis_url)), cluster.name).groups()
    return {g.address: g.id for g in groups if g.role == "prefill"}


def wait_blocks_free(cluster, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while blocks_used(cluster) != (0, 0):
        assert time.monotonic() < deadline, f"KV blocks still held: {blocks_used(cluster)}"
        time.sleep(0.1)


@pytest.mark.parametrize("cp,kvp,transport", [(1, 1, "tcp"), (2, 1, "auto"), (3, 2, "auto")])
def test_greedy_tokens_match_single_process_engine(clusters, engine, cp, kvp, transport):
    """Every layout (N prefill ranks to K decode ranks) and both KV transports: auto is NIXL
    here (it runs on CPU over UCX loopback), so NIXL and TCP give the same greedy tokens; in both
    security modes (secure: TLS on every interface, API keys on the router, MAC'd KV)."""
    cluster = clusters(cp, kvp, transport)
    expected = "tcp" if transport == "tcp" else "nixl"
    assert prefill_info(cluster).transport == expected
    with rpc.channel(cluster.decode, tls=cluster.tls) as dc:
        info = decode_pb2_grpc.DecodeStub(dc).GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=10)
    assert (info.transport, info.kvp_size) == (expected, kvp)
    with router_client(cluster, timeout=120) as c:
        for prompt in PROMPTS:
            chunks = list(c.generate(prompt, max_tokens=24))
            ids, text = reference(engine, prompt, 24)
            assert [t for c in chunks for t in c.token_ids] == ids, prompt
            assert "".join(c.text for c in chunks) == text
            last = chunks[-1]
            assert last.finish_reason in (1, 2) and last.usage.completion_tokens == len(ids)
            assert last.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    wait_blocks_free(cluster)


@secure_only
def test_secure_cluster_refuses_callers_without_a_key_or_certificate(clusters):
    """On the TLS cluster: no key or a wrong key gets UNAUTHENTICATED / PERMISSION_DENIED and
    reserves nothing; a plaintext client gets nowhere; Decode refuses a caller of another role."""
    cluster = clusters(2)
    for api_key, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.PERMISSION_DENIED)):
        with router_client(cluster, timeout=30, api_key=api_key) as c, pytest.raises(grpc.RpcError) as e:
            c.complete("The capital of France is", max_tokens=4)
        assert e.value.code() == code
        assert blocks_used(cluster) == (0, 0)
    with Client(cluster.router, timeout=10, api_key=API_KEY) as plain, pytest.raises(grpc.RpcError) as e:
        plain.complete("x", max_tokens=1)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    prefill_cert = [a for a in cluster.argv["prefill"] if a.endswith("prefill.pem")][0]
    as_prefill = ChannelTls(cluster.tls.ca, prefill_cert, prefill_cert.replace(".pem", "-key.pem"))
    with rpc.channel(cluster.decode, tls=as_prefill) as dc, pytest.raises(grpc.RpcError) as e:
        decode_pb2_grpc.DecodeStub(dc).Reserve(decode_pb2.ReserveRequest(request_id="x", prompt_tokens=8), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert blocks_used(cluster) == (0, 0)


@secure_only
def test_secure_cluster_https_api_takes_the_same_keys(clusters, engine):
    """The OpenAI-compatible API on the TLS router serves HTTPS with the router's certificate and
    passes the caller's Authorization header to Generate: 401 without a key, 403 with a wrong one."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    cluster = clusters(2)
    context = ssl.create_default_context(cafile=cluster.tls.ca)
    url = f"https://127.0.0.1:{cluster.https_port}/v1/completions"
    body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 4})

    def post(key):
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120, context=context) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert post(None)[0] == 401 and post("wrong")[0] == 403
    status, answer = post(API_KEY)
    assert status == 200 and answer["choices"][0]["text"] == reference(engine, "The capital of France is", 4)[1]
    wait_blocks_free(cluster)


def most_room():
    """A load with more room than any real group: the router's first pick."""
    from ringserve.registry_schema import Load

    return Load(free_blocks=10**6, total_blocks=10**6)


class RogueDecode(decode_pb2_grpc.DecodeServicer):
    """A Decode server a Redis writer points the router at: it counts every call that reaches it."""

    def __init__(self):
        self.calls = 0

    def Reserve(self, request, context):
        self.calls += 1
        context.abort(grpc.StatusCode.INTERNAL, "a rogue server got a call")

    GetInfo = Renew = Release = Reserve


@secure_only
def test_secure_cluster_sends_nothing_to_a_record_its_certificate_does_not_match(
    clusters, engine, tmp_path, redis_server, security
):
    """Registry integrity: a decode record naming 127.0.0.1:PORT, served there with a certificate of
    this deployment's CA for another host, or with another CA's certificate, gets no call (the
    handshake fails); requests go to the real decode group and give the engine's tokens."""
    from ringserve.config import DecodeConfig
    from ringserve.heartbeat import Registration

    cluster = clusters(2)
    bogus = [
        security.ca.issue("elsewhere", role="decode", cluster=cluster.name, hosts=("decode.elsewhere",)),
        CA(tmp_path / "foreign", "another-deployment").issue("decode", role="decode", cluster=cluster.name),
    ]
    for issued in bogus:
        rogue = RogueDecode()
        cfg = DecodeConfig(tls_cert=issued.cert, tls_key=issued.key, tls_ca=security.ca.path)
        add = decode_pb2_grpc.add_DecodeServicer_to_server
        server, port, _ = rpc.start_server([(add, rogue)], ["ringserve.v1.Decode"], "127.0.0.1", 0, limits=cfg)
        worker = DecodeConfig(redis_url=redis_server.url, cluster=cluster.name)
        registration = Registration(worker, "decode", 1, 64, most_room).start(f"127.0.0.1:{port}")
        try:
            time.sleep(2)  # the router reads the registry every 0.5 s
            with router_client(cluster, timeout=120) as c:
                for prompt in PROMPTS[:2]:
                    ids = [t for chunk in c.generate(prompt, max_tokens=8) for t in chunk.token_ids]
                    assert ids == reference(engine, prompt, 8)[0], prompt
            assert rogue.calls == 0
        finally:
            registration.deregister()
            server.stop(None)
    wait_blocks_free(cluster)


@secure_only
def test_secure_cluster_refuses_forged_and_replayed_landings_before_any_write(clusters, redis_server):
    """Prefill with a landing altered after the decode worker signed it, and again with a landing
    already used, is refused with PERMISSION_DENIED and sends no KV byte (the prefill group's
    counter); the genuine first use works."""
    cluster = clusters(2)
    sent = 'ringserve_kv_transfer_bytes_total{direction="sent",service="prefill"}'
    with rpc.channel(cluster.decode, tls=cluster.tls) as dc, rpc.channel(cluster.prefill, tls=cluster.tls) as pc:
        decode, prefill = decode_pb2_grpc.DecodeStub(dc), prefill_pb2_grpc.PrefillStub(pc)
        group = prefill_group_ids(cluster, redis_server.url)[cluster.prefill]
        reserve = decode.Reserve(
            decode_pb2.ReserveRequest(request_id="replay", prompt_tokens=8, max_tokens=4, prefill_group=group)
        )
        forged = [common_pb2.KVTarget() for _ in reserve.targets]
        for f, t in zip(forged, reserve.targets):
            f.CopyFrom(t)
            landing = bytearray(t.nixl_landing)
            landing[-33] ^= 0x01  # the last block id (before the 32-byte MAC): aim the WRITE elsewhere
            f.nixl_landing = bytes(landing)

        def run(targets):
            request = prefill_pb2.PrefillRequest(request_id="replay", token_ids=list(range(1, 9)), targets=targets)
            return prefill.Prefill(request, timeout=120)

        try:
            before = scrape(cluster, "prefill", sent)
            with pytest.raises(grpc.RpcError) as e:
                run(forged)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "fails its MAC" in e.value.details()
            assert scrape(cluster, "prefill", sent) == before
            run(reserve.targets)
            after = scrape(cluster, "prefill", sent)
            assert after > before
            with pytest.raises(grpc.RpcError) as e:
                run(reserve.targets)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "replay refused" in e.value.details()
            assert scrape(cluster, "prefill", sent) == after
        finally:
            decode.Release(decode_pb2.ReleaseRequest(request_id="replay"), timeout=10)
    wait_blocks_free(cluster)


@secure_only
def test_secure_cluster_refuses_a_landing_replayed_to_another_prefill_group(clusters, redis_server):
    """A landing the decode worker issued for the prefill group the router named in Reserve, used there,
    then presented to a second prefill group (whose replay guard never saw it): refused with
    PERMISSION_DENIED before that group WRITEs a byte (its counter)."""
    import signal

    cluster = clusters(2)
    other = cluster.add("prefill-b", ["prefill", "--cp", "1", "--calibrate-tokens", "256"], metrics=True)
    ids = prefill_group_ids(cluster, redis_server.url)
    sent = 'ringserve_kv_transfer_bytes_total{direction="sent",service="prefill"}'
    dc, pc, oc = (rpc.channel(a, tls=cluster.tls) for a in (cluster.decode, cluster.prefill, other))
    decode = decode_pb2_grpc.DecodeStub(dc)
    try:
        reserve = decode.Reserve(
            decode_pb2.ReserveRequest(
                request_id="moved", prompt_tokens=8, max_tokens=4, prefill_group=ids[cluster.prefill]
            ),
            timeout=30,
        )
        request = prefill_pb2.PrefillRequest(request_id="moved", token_ids=list(range(1, 9)), targets=reserve.targets)
        prefill_pb2_grpc.PrefillStub(pc).Prefill(request, timeout=120)
        with pytest.raises(grpc.RpcError) as e:
            prefill_pb2_grpc.PrefillStub(oc).Prefill(request, timeout=120)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
        assert ids[cluster.prefill] in e.value.details()
        assert scrape(cluster, "prefill-b", sent) == 0
    finally:
        decode.Release(decode_pb2.ReleaseRequest(request_id="moved"), timeout=10)
        for channel in (dc, pc, oc):
            channel.close()
        cluster.procs["prefill-b"].send_signal(signal.SIGTERM)  # it drains and deregisters
        cluster.procs["prefill-b"].wait(timeout=60)
    wait_blocks_free(cluster)


def test_repeated_prompt_reuses_the_prefix_cache(clusters, engine):
    """The same prompt twice: the second prefill reads the prompt's whole blocks from the prefix
    cache and gives the same greedy tokens. Afterwards the leader's blocks are exactly the cache's
    (the leader checks every other rank's count after each request, or fails the request)."""
    cluster = clusters(2)
    prompt = "A long document about ring attention and prefix caches. " * 16
    n = len(engine.tokenizer.encode(prompt))
    expected, _ = reference(engine, prompt, 16)
    usage = []
    with router_client(cluster, timeout=120) as client:
        for _ in range(2):
            chunks = list(client.generate(prompt, max_tokens=16))
            assert [t for c in chunks for t in c.token_ids] == expected
            usage.append(chunks[-1].usage)
    assert usage[0].cached_prompt_tokens == 0, "nothing else sent this prompt"
    assert usage[1].cached_prompt_tokens == (n - 1) // 64 * 64 > 0
    wait_blocks_free(cluster)
    cache = prefill_info(cluster).prefix_cache
    assert cache.hits >= 1 and cache.cached_prompt_tokens >= usage[1].cached_prompt_tokens
    assert sum(cache.blocks) >= n // 64 and cache.capacity_blocks == 256


def test_seeded_sampling_matches_the_engine(clusters, engine):
    """The prefill tier samples the first token and the decode tier the rest, yet a seed gives
    the engine's tokens: each step's RNG derives from (seed, step)."""
    cluster = clusters(2)
    prompt = "Write a haiku about the sea."
    # Values exact in float32 (the API carries floats), so both sides sample the same distribution.
    params = SamplingParams(max_tokens=16, temperature=0.75, top_p=0.5, top_k=40, seed=7)
    expected = [e.token_id for e in engine.generate(engine.tokenizer.encode(prompt), params)]
    with router_client(cluster, timeout=120) as client:
        chunks = client.generate(prompt, max_tokens=16, temperature=0.75, top_p=0.5, top_k=40, seed=7)
        assert [t for c in chunks for t in c.token_ids] == expected


def test_concurrent_streams_all_complete(clusters, engine):
    cluster = clusters(2)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" {i % 3}" * (i % 3) for i in range(32)]  # mixed lengths
    expected = {p: reference(engine, p, 8)[0] for p in set(prompts)}
    got: dict[int, list[int]] = {}
    errors = []

    def run(i):
        try:
            with router_client(cluster, timeout=300) as client:
                got[i] = [t for c in client.generate(prompts[i], max_tokens=8) for t in c.token_ids]
        except Exception as e:  # collected and reported below
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    for i, p in enumerate(prompts):
        assert got[i] == expected[p], f"stream {i} differs"
    wait_blocks_free(cluster)


def test_cancelled_stream_releases_blocks_on_both_tiers(clusters):
    cluster = clusters(2)
    with router_client(cluster, timeout=120) as client:
        stream = client.generate("Tell me a long story.", max_tokens=400, ignore_eos=True)
        for _, _ in zip(range(3), stream):
            pass
        assert blocks_used(cluster)[1] > 0, "the decode tier holds the request while it streams"
        stream.cancel()
    wait_blocks_free(cluster)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(token_ids=[1] * 9000), "context is 8192"),
        (dict(token_ids=[10**6]), "vocabulary"),
        (dict(prompt="hi", temperature=-1.0), "temperature"),
        (dict(prompt="hi", top_p=1.5), "top_p"),
        (dict(prompt="hi", max_tokens=0), "max_tokens"),
        (dict(prompt="hi", stop=[""]), "stop"),
        (dict(prompt="hi", stop_token_ids=[10**6]), "vocabulary"),
        (dict(prompt="hi", ttft_slo_seconds=-1.0), "ttft_slo_seconds"),
    ],
)
def test_bad_input_is_invalid_argument(clusters, kwargs, message):
    cluster = clusters(2)
    with router_client(cluster, timeout=60) as client, pytest.raises(grpc.RpcError) as err:
        list(client.generate(**kwargs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    wait_blocks_free(cluster)


def test_malformed_request_and_passed_deadline(clusters):
    cluster = clusters(2)
    from ringserve.v1 import router_pb2, router_pb2_grpc

    with router_channel(cluster) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(router_pb2.GenerateRequest()))  # no input at all
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "one of prompt, messages or token_ids" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(router_pb2.GenerateRequest(prompt="hi"), timeout=0.0001))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_blocks_free(cluster)


def test_health_reflection_tokenize_and_model_info(clusters, engine):
    cluster = clusters(2)
    for address in (cluster.router, cluster.prefill, cluster.decode):
        with rpc.channel(address, tls=cluster.tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with rpc.channel(cluster.router, tls=cluster.tls) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "ringserve.v1.Router" in names and "grpc.health.v1.Health" in names
    with router_client(cluster, timeout=30) as client:
        assert client.tokenize("The capital of France is") == engine.tokenizer.encode("The capital of France is")
        info = client.model_info()
        assert info.model.num_layers == 30 and info.model.max_context == 8192 and info.prefill_groups == 1


def test_chat_messages_use_the_template(clusters, engine):
    cluster = clusters(2)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    expected = "".join(e.text for e in engine.generate(ids, SamplingParams(max_tokens=16)))
    with router_client(cluster, timeout=60) as client:
        assert client.complete(messages=messages, max_tokens=16) == expected


def test_async_client_streams(clusters, engine):
    import asyncio

    cluster = clusters(2)

    async def main():
        async with async_router_client(cluster, timeout=60) as client:
            return await client.complete("The capital of France is", max_tokens=8)

    assert asyncio.run(main()) == reference(engine, "The capital of France is", 8)[1]


def test_metrics_count_requests_latency_blocks_and_bytes(clusters):
    import urllib.request

    cluster = clusters(2)
    with router_client(cluster, timeout=60) as client:
        list(client.generate("The capital of France is", max_tokens=4))

    def scrape(service: str) -> str:
        with urllib.request.urlopen(f"http://{cluster.metrics[service]}/metrics", timeout=10) as r:
            return r.read().decode()

    def value(text: str, prefix: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        assert lines, f"no metric {prefix}"
        return float(lines[0].rsplit(" ", 1)[1])

    router, prefill, decode = scrape("router"), scrape("prefill"), scrape("decode")
    assert value(router, 'ringserve_requests_total{method="Generate",service="router",status="OK"}') >= 1
    assert value(router, "ringserve_time_to_first_token_seconds_count") >= 1
    assert value(router, "ringserve_time_per_output_token_seconds_count") >= 1
    assert value(prefill, 'ringserve_kv_transfer_bytes_total{direction="sent",service="prefill"}') > 0
    assert value(decode, 'ringserve_kv_transfer_bytes_total{direction="received",service="decode"}') > 0
    assert value(decode, 'ringserve_kv_blocks{service="decode",state="free"}') > 0
    assert 'ringserve_queue_depth{service="decode"}' in decode


def test_generate_command_through_the_router(clusters, engine):
    cluster = clusters(2)
    run, env = cli_generate(cluster)
    proc = subprocess.run(
        [*run, "The capital of France is", "--max-tokens", "8"], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference(engine, "The capital of France is", 8)[1] + "\n"
    bad = subprocess.run([*run, "hi", "--top-p", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "top_p" in bad.stderr and "Traceback" not in bad.stderr


def test_unknown_model_path_fails_at_start_with_a_clear_message():
    proc = subprocess.run(
        [sys.executable, "-m", "ringserve.cli", "decode", "--port", "0", "--model", "/no/such/model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_killed_workers_end_requests_with_unavailable(tmp_path, security):
    """Kill the prefill group mid-prefill, then the decode worker mid-stream: the affected requests
    end with UNAVAILABLE promptly, the others finish, and nothing is left reserved."""
    cluster = security.start_cluster(cp=2, log_dir=str(tmp_path))
    try:
        with router_client(cluster, timeout=120) as client:
            survivor = client.generate("Count to one hundred.", max_tokens=60, ignore_eos=True)
            doomed = client.generate("Tell me a long story.", max_tokens=400, ignore_eos=True)
            next(survivor), next(doomed)
            long_prompt = client.generate(token_ids=[100 + i % 1000 for i in range(6000)], max_tokens=4)
            result = {}
            waiter = threading.Thread(target=lambda: result.update(error=_rpc_error(long_prompt)))
            waiter.start()
            time.sleep(1.0)  # the long prompt is now in prefill
            cluster.procs["prefill"].kill()
            t0 = time.monotonic()
            waiter.join(timeout=30)
            assert result["error"] == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 15
            assert len([c for c in survivor]) == 59, "a request already decoding is unaffected"
            with rpc.channel(cluster.decode, tls=cluster.tls) as dc:
                info = decode_pb2_grpc.DecodeStub(dc).GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=10)
            assert info.reserved_requests == 0 and info.active_requests == 1, "only the doomed stream holds blocks"
            cluster.procs["decode"].kill()
            t0 = time.monotonic()
            assert _rpc_error(doomed) == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 10
    finally:
        cluster.stop()


def _rpc_error(stream):
    try:
        list(stream)
    except grpc.RpcError as e:
        return e.code()
    return None
