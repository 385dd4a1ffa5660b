"""Groups that join, die and drain while the router runs, and a Redis outage: real service
processes, real gRPC on loopback, a real (embedded) Redis that the last test stops and restarts."""

import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from ringserve import rpc
from ringserve.config import RedisArgs
from ringserve.registry import Registry, connect
from ringserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.certs import router_client

TTL_S = 2.0
WORKER = ["--heartbeat-s", "0.25", "--registry-ttl-s", str(TTL_S)]
ROUTER = ["--refresh-s", "0.25"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, security):
    """CP=1 groups, short heartbeats and TTL, and a Redis of its own (the outage test stops it); the
    groups tests add get the cluster's security flags (``role_flags``)."""
    log_dir = str(tmp_path_factory.mktemp(f"elastic-{security.mode}"))
    c = security.start_cluster(
        cp=1, log_dir=log_dir, metrics=True, extra={"prefill": WORKER, "decode": WORKER, "router": ROUTER}
    )
    yield c
    c.stop()


def scrape(cluster, service: str, sample: str) -> float:
    """One sample of a service's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://{cluster.metrics[service]}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def prefill_groups(cluster) -> int:
    with router_client(cluster, timeout=10) as client:
        return client.model_info().prefill_groups


def active_requests(cluster, name: str, role: str) -> int:
    with rpc.channel(cluster.addresses[name], tls=cluster.tls) as channel:
        if role == "prefill":
            return (
                prefill_pb2_grpc.PrefillStub(channel)
                .GetInfo(prefill_pb2.GetPrefillInfoRequest(), timeout=10)
                .active_requests
            )
        info = decode_pb2_grpc.DecodeStub(channel).GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=10)
        return info.active_requests + info.reserved_requests


def busy(cluster, role: str, names: tuple[str, ...]) -> str:
    """The first of ``names`` that holds a request (waiting for one to get it)."""
    deadline = time.monotonic() + 30
    while True:
        for name in names:
            if active_requests(cluster, name, role):
                return name
        assert time.monotonic() < deadline, f"no {role} group took the request"
        time.sleep(0.05)


PREFILL_OK = 'ringserve_requests_total{method="Prefill",service="prefill",status="OK"}'


def test_new_group_gets_traffic_and_killed_group_stops_getting_it(cluster):
    cluster.add("prefill2", ["prefill", "--cp", "1", *WORKER], metrics=True)
    ready = time.monotonic()
    with router_client(cluster, timeout=60) as client:
        while scrape(cluster, "prefill2", PREFILL_OK) == 0:
            assert time.monotonic() - ready < 5.0, "a new group gets traffic within 5 s"
            client.complete("The capital of France is", max_tokens=1)
        assert prefill_groups(cluster) == 2

        cluster.procs["prefill2"].kill()  # no drain, no deregistration: the TTL removes it
        killed = time.monotonic()
        while prefill_groups(cluster) == 2:
            assert time.monotonic() - killed < TTL_S + 1.0, "a dead group leaves the registry within its TTL"
            # Requests routed to it meanwhile move to the live group: none fails.
            assert client.complete("The capital of France is", max_tokens=1)
        assert client.complete("The capital of France is", max_tokens=4).startswith(" Paris")


def test_drained_groups_finish_their_requests_and_refuse_new_ones(cluster):
    """SIGTERM a decode group that streams a request and a prefill group that runs one: both
    requests complete; new work meets UNAVAILABLE there (and succeeds through the router); the
    processes exit once idle."""
    cluster.add("decode2", ["decode", *WORKER])
    cluster.add("prefill3", ["prefill", "--cp", "1", *WORKER])
    # The router learns of new groups at its next registry read: wait for it, so that a request
    # refused by a draining group has another group to go to.
    deadline = time.monotonic() + 60
    while True:
        with router_client(cluster, timeout=10) as client:
            info = client.model_info()
        if (info.prefill_groups, info.decode_groups) == (2, 2):
            break
        known = f"{info.prefill_groups} prefill and {info.decode_groups} decode groups"
        assert time.monotonic() < deadline, f"after 60 s the router knows only {known}"
        time.sleep(0.05)
    results = {}

    def run(name, **kwargs):
        # Generous deadlines: they only guard against hangs (120 tokens take minutes on 2 loaded cores).
        with router_client(cluster, timeout=600) as client:
            results[name] = [t for c in client.generate(**kwargs) for t in c.token_ids]

    story = dict(prompt="Tell me a story.", max_tokens=120, ignore_eos=True)
    stream = threading.Thread(target=run, args=("stream",), kwargs=story)
    stream.start()
    decode = busy(cluster, "decode", ("decode", "decode2"))
    long_prompt = dict(token_ids=[100 + i % 1000 for i in range(2500)], max_tokens=2)
    prompt = threading.Thread(target=run, args=("long",), kwargs=long_prompt)
    prompt.start()
    prefill = busy(cluster, "prefill", ("prefill", "prefill3"))

    for name in (decode, prefill):
        cluster.procs[name].terminate()
    time.sleep(0.5)
    assert cluster.procs[decode].poll() is None and cluster.procs[prefill].poll() is None, "still draining"
    with rpc.channel(cluster.addresses[decode], tls=cluster.tls) as channel, pytest.raises(grpc.RpcError) as err:
        decode_pb2_grpc.DecodeStub(channel).Reserve(
            decode_pb2.ReserveRequest(request_id="x", prompt_tokens=1, max_tokens=1), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
    with router_client(cluster, timeout=60) as client:
        assert client.complete("The capital of France is", max_tokens=4).startswith(" Paris")

    stream.join(timeout=600)
    prompt.join(timeout=600)
    assert len(results["stream"]) == 120 and len(results["long"]) == 2
    for name in (decode, prefill):
        assert cluster.procs[name].wait(timeout=120) == 0


def child_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_group_whose_rank_dies_leaves_at_once_and_exits(cluster):
    """Kill a child rank of an idle CP=2 group: the group leaves the registry at once (not after
    its TTL), its process exits so that a supervisor starts a fresh one, and requests go on
    being served by the other group."""
    name = "prefill-cp2"
    cluster.add(name, ["prefill", "--cp", "2", "--registry-ttl-s", "600", "--heartbeat-s", "0.25"])
    registry = Registry(connect(RedisArgs(redis_url=cluster.redis_url)), cluster.name)
    address = cluster.addresses[name]
    deadline = time.monotonic() + 30
    while address not in [g.address for g in registry.groups()]:
        assert time.monotonic() < deadline, "the CP=2 group registers"
        time.sleep(0.1)
    rank1 = [p for p in child_pids(cluster.procs[name].pid) if "spawn" in open(f"/proc/{p}/cmdline").read()]
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], signal.SIGKILL)
    killed = time.monotonic()
    while address in [g.address for g in registry.groups()]:
        assert time.monotonic() - killed < 10, "a broken group leaves the registry at once (its TTL is 600 s)"
        time.sleep(0.1)
    assert cluster.procs[name].wait(timeout=60) == 0, "the broken group's process exits"
    with router_client(cluster, timeout=60) as client:
        assert client.complete("The capital of France is", max_tokens=4).startswith(" Paris")
    with open(f"{cluster.log_dir}/{name}.log") as f:
        assert "prefill-rank1 (exit code -9) died" in f.read()


def test_a_prompt_over_grpc_default_message_size_gets_a_clean_too_long(cluster):
    """A 10M-token prompt (30 MB of packed token ids, far over gRPC's 4 MiB default: the context
    ringserve is built for) passes the transport; the router then refuses it as longer than this
    model's context, not gRPC as too large a message."""
    ids = [20000] * 10_000_000
    with router_client(cluster, timeout=120) as client, pytest.raises(grpc.RpcError) as err:
        client.complete(token_ids=ids, max_tokens=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "context" in err.value.details()


def test_router_serves_through_a_redis_outage_and_recovers(cluster):
    fallback = 'ringserve_router_decisions_total{policy="least_loaded_fallback"}'
    redis_up = 'ringserve_redis_up{service="router"}'
    cluster.redis.stop()
    deadline = time.monotonic() + 5
    while scrape(cluster, "router", redis_up) != 0:
        assert time.monotonic() < deadline, "the router notices within a few refreshes"
        time.sleep(0.1)
    before = scrape(cluster, "router", fallback)
    with router_client(cluster, timeout=60) as client:
        for _ in range(3):
            assert client.complete("The capital of France is", max_tokens=4).startswith(" Paris")
    assert scrape(cluster, "router", fallback) == before + 3
    with open(f"{cluster.log_dir}/router.log") as f:
        assert "unreachable" in f.read()

    cluster.redis.start()  # empty: the groups re-register by themselves
    registry = Registry(connect(RedisArgs(redis_url=cluster.redis_url)), cluster.name)
    deadline = time.monotonic() + 5
    while scrape(cluster, "router", redis_up) != 1 or len(registry.groups()) < 2:
        assert time.monotonic() < deadline, "registry and router recover after Redis returns"
        time.sleep(0.1)
    cache_aware = 'ringserve_router_decisions_total{policy="cache_aware"}'
    before = scrape(cluster, "router", cache_aware)
    with router_client(cluster, timeout=60) as client:
        assert client.complete("The capital of France is", max_tokens=4).startswith(" Paris")
    assert scrape(cluster, "router", cache_aware) == before + 1
