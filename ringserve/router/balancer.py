"""The router's view of the groups, and the choice of a prefill and a decode group per request.

Groups come only from the registry in Redis, re-read with their load in the background every
``refresh_s``: a group that registers gets traffic after the next read, one that drains or dies
drops out (dead ones after their TTL), except the last of its role, which stays until another
registers. A group that fails a call as unavailable (dead, broken, draining) is marked down at
once and skipped while other groups of its role are up, until a health probe (each refresh) sees
it SERVING again; a restarted group registers under a new id, so it is a new, up group. Under
cache_aware each decision asks Redis once for every prefill group's cached prefix of the prompt
(``registry.Registry.probe``), then scores (``router.policy``). Load is what the groups last
reported plus what this router sent them since, so a burst of one hot prefix does not pile onto
one group.

Redis is advisory. When it cannot be reached the router keeps serving: the last known groups and
loads, cache_aware falls back to least_loaded (``ringserve_router_decisions_total{policy=
"least_loaded_fallback"}``), a warning in the log and ``ringserve_redis_up{service="router"} 0``;
it returns to normal after the next good read.
Router replicas share everything through Redis; a restarted router rebuilds its view in one read.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass, field

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ringserve import rpc
from ringserve.config import RouterConfig
from ringserve.engine.kv_cache import block_hashes, blocks_needed
from ringserve.errors import InvalidArgument, Unavailable
from ringserve.metrics import REDIS_UP, ROUTER_DECISION_SECONDS, ROUTER_DECISIONS, ROUTER_GROUPS
from ringserve.registry import Registry, connect, redacted
from ringserve.registry_schema import ROLES, GroupRecord
from ringserve.router.policy import POLICIES, DecodeCandidate, PrefillCandidate, pick_decode, pick_prefill
from ringserve.v1 import decode_pb2_grpc, prefill_pb2_grpc

log = logging.getLogger(__name__)

_STUBS = {"prefill": prefill_pb2_grpc.PrefillStub, "decode": decode_pb2_grpc.DecodeStub}


class Group:
    """A group the router knows: its latest record, and this router's own work there."""

    def __init__(self, record: GroupRecord):
        self.record = record
        self.pending_tokens = 0  # prefill: tokens sent here and not yet prefilled
        self.inflight = 0  # decode: requests sent here and not finished
        self.down = False  # a call failed as unavailable; until a health probe sees it SERVING
        self._channel = None
        self._stub = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def address(self) -> str:
        return self.record.address

    @property
    def channel(self) -> grpc.Channel:
        """The channel, connected on first use (the benchmark's groups are never called)."""
        if self._channel is None:
            self._channel = rpc.channel(self.address)
        return self._channel

    @property
    def stub(self):
        """The role's stub (Prefill or Decode) over ``channel``."""
        if self._stub is None:
            self._stub = _STUBS[self.record.role](self.channel)
        return self._stub


@dataclass
class Decision:
    """Where one request runs, and what the choice assumed (undone by ``Balancer.release``)."""

    prefill: Group
    decode: Group
    policy: str
    prompt_tokens: int
    max_tokens: int
    cached_tokens: int  # the prefix the prefill group is expected to hold
    chains: dict[int, list[bytes]]  # block size -> the prompt's block hashes, kept for a re-pick
    tried: set[str] = field(default_factory=set)  # ids of groups this request left after a failure

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class Balancer:
    """Discovers groups from the registry and picks them per request under a policy."""

    def __init__(self, cfg: RouterConfig):
        if cfg.policy not in POLICIES:
            raise InvalidArgument(f"--policy must be one of {', '.join(POLICIES)}, got {cfg.policy!r}")
        self.policy, self.refresh_s = cfg.policy, cfg.refresh_s
        self.redis_url = redacted(cfg.redis_url)  # for logs and messages only
        self.registry = Registry(connect(cfg), cfg.cluster)
        self.groups: dict[str, Group] = {}
        self.lock = threading.Lock()
        self.redis_ok: bool | None = None
        self.turn = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-refresh", daemon=True)

    def start(self) -> Balancer:
        self.refresh()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
                self.probe_down()
            except Exception:  # a bug: keep refreshing, or the view silently freezes
                log.exception("reading the registry failed")

    def probe_down(self, timeout_s: float = 0.5) -> None:
        """Health-check the groups marked down (in parallel); one that answers SERVING is up again."""
        with self.lock:
            down = [g for g in self.groups.values() if g.down]
        checks = [
            (g, health_pb2_grpc.HealthStub(g.channel).Check.future(health_pb2.HealthCheckRequest(), timeout=timeout_s))
            for g in down
        ]
        for g, check in checks:
            try:
                serving = check.result().status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                serving = False
            if serving:
                g.down = False
                log.info("%s group %s answers SERVING again: back in rotation", g.record.role, g.address)

    def refresh(self) -> None:
        """Re-read the registry; on failure keep the groups known so far."""
        try:
            records = self.registry.groups()
        except redis.RedisError as e:
            self._redis_state(False, e)
            return
        with self.lock:
            fresh = {r.id: self.groups.get(r.id) or Group(r) for r in records}
            for r in records:
                fresh[r.id].record = r
            for role in ROLES:
                # None listed (say Redis restarted and no group has re-registered yet): keep the last
                # known ones. Nothing else could serve the request, and a dead one fails over fast.
                if not any(r.role == role for r in records):
                    fresh.update({g.id: g for g in self.groups.values() if g.record.role == role})
            self.groups = fresh
        for role in ROLES:
            ROUTER_GROUPS.labels(role).set(sum(r.role == role for r in records))
        self._redis_state(True)

    def _redis_state(self, ok: bool, error: Exception | None = None) -> None:
        if ok == self.redis_ok:
            return
        if ok:
            log.info(
                "Redis at %s reachable: routing with policy %s on the registry's groups", self.redis_url, self.policy
            )
        else:
            log.warning(
                "Redis at %s unreachable (%s): routing with policy least_loaded on the %d groups known so far "
                "until it returns",
                self.redis_url,
                error,
                len(self.groups),
            )
        REDIS_UP.labels("router").set(int(ok))
        self.redis_ok = ok

    def known(self, role: str) -> list[Group]:
        with self.lock:
            return [g for g in self.groups.values() if g.record.role == role]

    def wait_for_groups(self, timeout_s: float) -> None:
        """Block until at least one prefill and one decode group are registered."""
        deadline = time.monotonic() + timeout_s
        while not (self.known("prefill") and self.known("decode")):
            if time.monotonic() > deadline:
                if not self.redis_ok:
                    raise Unavailable(
                        f"Redis at {self.redis_url} unreachable for {timeout_s:.0f} s: the router finds its groups "
                        "there; start Redis or fix --redis-url (and --redis-password-file / TLS options)"
                    )
                missing = " and ".join(r for r in ROLES if not self.known(r))
                raise Unavailable(
                    f"no {missing} group registered within {timeout_s:.0f} s in Redis at {self.redis_url} under "
                    f"cluster {self.registry.keys.ns.split(':', 1)[1]!r}: start one with the same --redis-url "
                    "and --cluster"
                )
            time.sleep(min(self.refresh_s, 0.2))
            self.refresh()

    def _candidates(self, role: str, exclude: set[str]) -> list[Group]:
        """Groups of ``role`` in a stable order (the registry's, by id); ones marked down only if
        nothing else is left."""
        groups = [g for g in self.groups.values() if g.record.role == role and g.id not in exclude]
        healthy = [g for g in groups if not g.down]
        if not (healthy or groups):
            raise Unavailable(
                f"no {role} group available: none is registered in Redis at {self.redis_url}, or all failed"
            )
        return healthy or groups

    def pick(self, token_ids: list[int], max_tokens: int) -> Decision:
        """Choose the prefill and decode groups for a prompt (hashing its blocks here)."""
        chains = {}
        if self.policy == "cache_aware" and self.redis_ok:
            for size in {g.record.block_size for g in self.known("prefill")}:
                chains[size] = block_hashes(token_ids, size)
        return self.decide(len(token_ids), max_tokens, chains)

    def decide(self, prompt_tokens: int, max_tokens: int, chains: dict[int, list[bytes]]) -> Decision:
        """Choose the groups for a prompt of ``prompt_tokens`` whose block hashes are ``chains``."""
        t0 = time.perf_counter()
        with self.lock:
            prefill, decode = self._candidates("prefill", set()), self._candidates("decode", set())
        hits, policy = self._cached_blocks(prefill, chains)
        with self.lock:
            p, cached = self._choose_prefill(policy, prefill, hits, prompt_tokens)
            d = self._choose_decode(decode, prompt_tokens + max_tokens)
            self.turn += 1
            decision = Decision(p, d, policy, prompt_tokens, max_tokens, cached, chains)
            p.pending_tokens += decision.uncached_tokens
            d.inflight += 1
        ROUTER_DECISIONS.labels(policy).inc()
        ROUTER_DECISION_SECONDS.observe(time.perf_counter() - t0)
        return decision

    def repick(self, decision: Decision, role: str, down: bool = True, keep_if_alone: bool = False) -> bool:
        """The decision's ``role`` group failed this request: move it to a group of that role it has not
        tried. ``down``: the group itself is at fault (unavailable, broken), so mark it down for every
        request; else (it is full) only this request leaves it. With no other group: keep the failed one
        if ``keep_if_alone`` (a failed KV push is worth another try), else False (decision unchanged)."""
        failed: Group = getattr(decision, role)
        with self.lock:
            failed.down = failed.down or down
            decision.tried.add(failed.id)
            try:
                others = self._candidates(role, decision.tried)
            except Unavailable:
                return keep_if_alone
        hits, policy = self._cached_blocks(others, decision.chains) if role == "prefill" else (None, "")
        with self.lock:
            if role == "prefill":
                failed.pending_tokens -= decision.uncached_tokens
                decision.prefill, decision.cached_tokens = self._choose_prefill(
                    policy, others, hits, decision.prompt_tokens
                )
                decision.prefill.pending_tokens += decision.uncached_tokens
            else:
                failed.inflight -= 1
                decision.decode = self._choose_decode(others, decision.prompt_tokens + decision.max_tokens)
                decision.decode.inflight += 1
        return True

    def mark_down(self, group: Group) -> None:
        """``group`` failed a call as unavailable: skip it until a probe sees it SERVING."""
        group.down = True

    def charge(self, decision: Decision) -> None:
        """Count the decision's prompt as pending at its prefill group again (a migration re-prefills)."""
        with self.lock:
            decision.prefill.pending_tokens += decision.uncached_tokens

    def release(self, decision: Decision, role: str) -> None:
        """Undo the decision's accounting for ``role``: prefill done, or the request finished."""
        with self.lock:
            if role == "prefill":
                decision.prefill.pending_tokens -= decision.uncached_tokens
            else:
                decision.decode.inflight -= 1

    def _cached_blocks(self, prefill: list[Group], chains: dict[int, list[bytes]]) -> tuple[list[int] | None, str]:
        """Each group's cached prefix of the prompt in blocks (one round trip), or None where the
        policy needs none or Redis is down; and the policy to apply."""
        if self.policy != "cache_aware":
            return None, self.policy
        if not self.redis_ok:
            return None, "least_loaded_fallback"
        sizes = sorted(chains)
        no_chain = len(sizes)  # an empty chain, last: for groups whose block size was not hashed
        chain_of = [(g.id, sizes.index(g.record.block_size) if g.record.block_size in chains else no_chain)
                    for g in prefill]  # fmt: skip
        try:
            return self.registry.probe(chain_of, [*(chains[s] for s in sizes), []]), self.policy
        except redis.RedisError as e:
            self._redis_state(False, e)
            return None, "least_loaded_fallback"

    def _choose_prefill(
        self, policy: str, groups: list[Group], hits: list[int] | None, prompt_tokens: int
    ) -> tuple[Group, int]:
        """(group, expected cached tokens) by the policy, on the groups' last reported load and this
        router's own requests since."""
        speeds = [g.record.load.tokens_per_s for g in groups if g.record.load.tokens_per_s > 0]
        default_speed = statistics.median(speeds) if speeds else 1.0  # unmeasured: as fast as the others
        candidates = []
        for i, g in enumerate(groups):
            load = g.record.load
            cached = min(hits[i] * g.record.block_size, prompt_tokens) if hits else 0
            queued = max(load.queued_tokens, g.pending_tokens)
            candidates.append(PrefillCandidate(cached, queued, load.tokens_per_s or default_speed))
        scoring = "least_loaded" if policy == "least_loaded_fallback" else policy
        i = pick_prefill(scoring, candidates, prompt_tokens, self.turn)
        return groups[i], candidates[i].cached_tokens

    def _choose_decode(self, groups: list[Group], tokens: int) -> Group:
        candidates = [
            DecodeCandidate(
                max(g.record.load.active_requests, g.inflight),
                g.record.load.free_blocks,
                blocks_needed(tokens, g.record.block_size),
            )
            for g in groups
        ]
        return groups[pick_decode(candidates, self.turn)]
