"""Routing decisions on residency and load constructed in a real Redis (registered groups without
servers: a decision never calls a group), the scoring rules, and the fallback while Redis is down."""

import logging
import time
import uuid

import pytest
from prometheus_client import REGISTRY

from ringserve.config import RouterConfig, WorkerArgs
from ringserve.engine.kv_cache import block_hashes
from ringserve.errors import InvalidArgument, Unavailable
from ringserve.heartbeat import Registration
from ringserve.redis_server import EmbeddedRedis
from ringserve.registry_schema import Load
from ringserve.router.balancer import Balancer
from ringserve.router.policy import DecodeCandidate, PrefillCandidate, expected_ttft, pick_decode, pick_prefill

BLOCK = 4
DOC = list(range(100, 132))  # 32 tokens: 8 blocks of 4
UNCACHED = list(range(500, 532))  # held by no group
CHAIN = block_hashes(DOC, BLOCK)


def eventually(check, timeout_s: float = 3.0):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not true within {timeout_s} s"
        time.sleep(0.02)


class Deployment:
    """Prefill groups p0..p2 and decode groups d0, d1 registered with settable load and residency."""

    def __init__(self, redis_url: str, policy: str = "cache_aware"):
        self.worker = WorkerArgs(
            redis_url=redis_url, cluster=f"test-{uuid.uuid4().hex[:8]}", heartbeat_s=0.05, registry_ttl_s=1.0
        )
        self.load = {g: Load(free_blocks=100, total_blocks=100, tokens_per_s=100.0) for g in ("p0", "p1", "p2")}
        self.load |= {"d0": Load(free_blocks=100, total_blocks=100), "d1": Load(free_blocks=100, total_blocks=100)}
        self.stored: dict[str, list[bytes]] = {"p1": CHAIN[:6], "p2": CHAIN[:2]}
        self.regs = {}
        for g in self.load:
            role = "prefill" if g.startswith("p") else "decode"
            self.regs[g] = Registration(self.worker, role, 1, BLOCK, lambda g=g: self.load[g], self._changes(g))
            self.regs[g].start(f"{g}:1")
        cfg = RouterConfig(redis_url=redis_url, cluster=self.worker.cluster, policy=policy, refresh_s=0.05)
        self.balancer = Balancer(cfg).start()
        self.names = {reg.id: g for g, reg in self.regs.items()}

    def _changes(self, g):
        def changes():
            return self.stored.pop(g, []), []

        return changes

    def pick(self, ids=DOC, max_tokens=8, release=True):
        decision = self.balancer.pick(ids, max_tokens)
        if release:
            self.balancer.release(decision, "prefill")
            self.balancer.release(decision, "decode")
        return self.names[decision.prefill.id], self.names[decision.decode.id], decision

    def set_load(self, g, **fields):
        for k, v in fields.items():
            setattr(self.load[g], k, v)
        time.sleep(0.15)  # a few heartbeats

    def close(self):
        self.balancer.close()
        for reg in self.regs.values():
            reg.stop()


@pytest.fixture
def deployment(redis_server):
    d = Deployment(redis_server.url)
    yield d
    d.close()


def test_scoring_rules():
    # Expected TTFT: queue plus uncached tokens, at the group's speed.
    assert expected_ttft(PrefillCandidate(cached_tokens=600, queued_tokens=200, tokens_per_s=100.0), 1000) == 6.0
    fast_cold, slow_warm = PrefillCandidate(0, 0, 1000.0), PrefillCandidate(900, 0, 200.0)
    assert pick_prefill("cache_aware", [fast_cold, slow_warm], 1000, turn=0) == 1  # 0.5 s against 1 s
    assert pick_prefill("cache_aware", [fast_cold, PrefillCandidate(900, 0, 50.0)], 1000, turn=0) == 0  # 2 s
    assert pick_prefill("least_loaded", [PrefillCandidate(900, 10, 1.0), PrefillCandidate(0, 5, 1.0)], 9, 0) == 1
    equal = [PrefillCandidate(0, 0, 1.0)] * 3
    assert [pick_prefill("cache_aware", equal, 10, t) for t in range(4)] == [0, 1, 2, 0]  # ties take turns
    assert [pick_prefill("round_robin", [fast_cold, slow_warm], 10, t) for t in range(3)] == [0, 1, 0]
    # Decode: room first, then fewest active requests; nothing has room: the most free blocks.
    assert pick_decode([DecodeCandidate(0, 3, 4), DecodeCandidate(9, 50, 4), DecodeCandidate(2, 8, 4)], 0) == 2
    assert pick_decode([DecodeCandidate(0, 3, 40), DecodeCandidate(9, 5, 40)], 0) == 1


def test_cache_aware_prefers_the_longest_prefix_until_load_outweighs_it(deployment):
    d = deployment
    prefill, decode, decision = d.pick()
    assert prefill == "p1" and decision.cached_tokens == 24 and decision.policy == "cache_aware"
    # A queue at p1 worth more than recomputing: p2 (2 blocks cached) beats p0 (none).
    d.set_load("p1", queued_tokens=1000)
    assert d.pick()[0] == "p2"
    # Speed counts too: a slow group with the longest prefix loses to a fast one with less.
    d.set_load("p1", queued_tokens=0, tokens_per_s=10.0)  # 8 tokens at 10/s against p2's 24 at 100/s
    assert d.pick()[0] == "p2"


def test_one_hot_prefix_spreads_when_requests_pile_up(deployment):
    """Picks that are not yet finished count as load at once, before any heartbeat reports them."""
    picked = [deployment.pick(release=False)[0] for _ in range(12)]
    assert picked[0] == "p1"
    assert set(picked) == {"p0", "p1", "p2"}
    assert picked.count("p1") > picked.count("p2") >= picked.count("p0")  # the cached prefix still counts


def test_decode_group_needs_room_then_fewest_requests(deployment):
    d = deployment
    d.set_load("d0", free_blocks=2)  # 32 + 8 tokens need 10 blocks
    d.set_load("d1", active_requests=5)
    assert {d.pick()[1] for _ in range(4)} == {"d1"}
    d.set_load("d0", free_blocks=100)
    assert {d.pick()[1] for _ in range(4)} == {"d0"}


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin"])
def test_other_policies_ignore_residency(redis_server, policy):
    d = Deployment(redis_server.url, policy)
    try:
        d.set_load("p1", queued_tokens=50)
        d.set_load("p2", queued_tokens=10)
        picks = [d.pick()[0] for _ in range(6)]
        if policy == "least_loaded":
            assert picks == ["p0"] * 6
        else:
            assert sorted(picks) == ["p0", "p0", "p1", "p1", "p2", "p2"]
            assert picks[:3] in (["p0", "p1", "p2"], ["p1", "p2", "p0"], ["p2", "p0", "p1"])
    finally:
        d.close()


def test_router_start_says_what_is_missing(redis_server):
    from ringserve.launch import free_port

    nowhere = Balancer(RouterConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", refresh_s=0.05)).start()
    with pytest.raises(Unavailable, match="unreachable .* start Redis or fix --redis-url"):
        nowhere.wait_for_groups(0.2)
    nowhere.close()
    empty = Balancer(RouterConfig(redis_url=redis_server.url, cluster="nobody-here", refresh_s=0.05)).start()
    with pytest.raises(Unavailable, match="no prefill and decode group registered .* cluster 'nobody-here'"):
        empty.wait_for_groups(0.2)
    empty.close()


def test_unknown_policy_is_refused(redis_server):
    with pytest.raises(InvalidArgument, match="cache_aware, least_loaded, round_robin"):
        Balancer(RouterConfig(redis_url=redis_server.url, policy="random"))


def test_groups_come_and_go_with_the_registry(deployment):
    d = deployment
    late = Registration(d.worker, "prefill", 1, BLOCK, lambda: Load(tokens_per_s=100.0)).start("late:1")
    d.names[late.id] = "late"
    try:
        eventually(lambda: "late" in {d.pick(UNCACHED)[0] for _ in range(4)})
        for g in ("p1", "p2"):
            d.regs[g].deregister()
        late.stop()  # dies: gone after its TTL (1 s)
        eventually(lambda: [d.names[g.id] for g in d.balancer.known("prefill")] == ["p0"], timeout_s=2.0)
        d.regs["p0"].deregister()  # the last one stays known: nothing else could serve
        time.sleep(0.2)
        assert [d.names[g.id] for g in d.balancer.known("prefill")] == ["p0"]
        fresh = Registration(d.worker, "prefill", 1, BLOCK, Load).start("fresh:1")  # until another registers
        eventually(lambda: [g.id for g in d.balancer.known("prefill")] == [fresh.id])
        fresh.deregister()
    finally:
        late.stop()


def _sample(name, labels):
    return REGISTRY.get_sample_value(name, labels)


def test_redis_outage_falls_back_to_least_loaded_and_recovers(caplog):
    server = EmbeddedRedis().start()
    d = Deployment(server.url)
    try:
        assert d.pick()[0] == "p1"
        d.set_load("p0", queued_tokens=30)
        with caplog.at_level(logging.WARNING, logger="ringserve.router.balancer"):
            server.stop()
            eventually(lambda: d.balancer.redis_ok is False)
        assert any("unreachable" in r.getMessage() and "least_loaded" in r.getMessage() for r in caplog.records)
        assert _sample("ringserve_redis_up", {"service": "router"}) == 0
        before = _sample("ringserve_router_decisions_total", {"policy": "least_loaded_fallback"}) or 0
        prefill, decode, decision = d.pick()  # the last known groups and loads: p0's queue counts
        assert decision.policy == "least_loaded_fallback" and decision.cached_tokens == 0
        assert prefill in ("p1", "p2") and decode in ("d0", "d1")
        assert _sample("ringserve_router_decisions_total", {"policy": "least_loaded_fallback"}) == before + 1

        server.start()  # empty: the groups re-register and republish their residency
        eventually(lambda: d.balancer.redis_ok and len(d.balancer.known("prefill")) == 3, timeout_s=5.0)
        assert _sample("ringserve_redis_up", {"service": "router"}) == 1
        eventually(lambda: d.pick()[2].cached_tokens == 24)  # p1's residency is back
        prefill, _, decision = d.pick()
        assert (prefill, decision.policy) == ("p1", "cache_aware")
    finally:
        d.close()
        server.stop()


def test_router_starts_and_routes_beside_a_malformed_record(redis_server):
    """One broken record in the registry does not stop the router's view: it starts and routes to
    the good groups."""
    import redis

    cluster = f"test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server.url)
    client.hset(f"ringserve:{cluster}:group:broken", mapping={"role": "prefill", "address": "x:1"})
    client.sadd(f"ringserve:{cluster}:groups", "broken")
    worker = WorkerArgs(redis_url=redis_server.url, cluster=cluster, heartbeat_s=0.05, registry_ttl_s=1.0)
    regs = [Registration(worker, role, 1, BLOCK, Load).start(f"{role}:1") for role in ("prefill", "decode")]
    balancer = Balancer(RouterConfig(redis_url=redis_server.url, cluster=cluster, refresh_s=0.05)).start()
    try:
        balancer.wait_for_groups(5.0)
        decision = balancer.pick(DOC, 8)
        assert (decision.prefill.id, decision.decode.id) == (regs[0].id, regs[1].id)
    finally:
        balancer.close()
        for reg in regs:
            reg.stop()


def test_a_failed_group_is_down_until_its_health_probe_says_serving(redis_server):
    """A group that failed a request as unavailable gets no traffic while another is up, also past
    its registry TTL, until a health probe sees it SERVING again."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    checks.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # say a rank died
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    worker = WorkerArgs(redis_url=redis_server.url, cluster=f"test-{uuid.uuid4().hex[:8]}", heartbeat_s=0.05,
                        registry_ttl_s=0.5)  # fmt: skip
    load = Load(free_blocks=100, total_blocks=100, tokens_per_s=100.0)
    sick = Registration(worker, "prefill", 1, BLOCK, lambda: load).start(f"127.0.0.1:{port}")
    others = [Registration(worker, role, 1, BLOCK, lambda: load).start(f"{role}:1") for role in ("prefill", "decode")]
    balancer = Balancer(RouterConfig(redis_url=redis_server.url, cluster=worker.cluster, refresh_s=3600)).start()
    try:
        decision = next(d for d in (balancer.pick(UNCACHED, 8) for _ in range(4)) if d.prefill.id == sick.id)
        assert balancer.repick(decision, "prefill") and decision.prefill.id == others[0].id
        time.sleep(0.6)  # past the TTL: still down
        balancer.refresh()
        balancer.probe_down()
        assert {balancer.pick(UNCACHED, 8).prefill.id for _ in range(4)} == {others[0].id}
        checks.set("", health_pb2.HealthCheckResponse.SERVING)
        balancer.probe_down()
        assert sick.id in {balancer.pick(UNCACHED, 8).prefill.id for _ in range(4)}
    finally:
        balancer.close()
        for reg in [sick, *others]:
            reg.stop()
        server.stop(0)
