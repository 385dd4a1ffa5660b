"""`ringserve planner`: scales the prefill and decode StatefulSets, each on the signal that limits it.

Every --interval-s it reads every group's load from the registry in Redis (``Registry.groups()``: the
records the groups' ``Registration`` heartbeats write) and each StatefulSet's replicas from the
Kubernetes API's scale subresource, and decides per tier:

- prefill needs ``sum(queued_tokens / tokens_per_s) / ttft_target_s`` groups: the queued prompt work,
  in seconds of one group, that a new request would wait behind, against the TTFT target;
- decode needs ``max(KV blocks in use / (blocks per group * kv_target), active requests / requests
  target)`` groups.

Optionally (--prometheus-url) prefill also reads the rate of missed TTFT deadlines
(``ringserve_prefill_deadlines_total``): while it is above zero, prefill does not scale down, and it
gets one group more than it has, at most once per stabilisation window (the rate lags by its window).

Scale-up is immediate (to ``ceil(need)``). Scale-down has hysteresis (fewer groups only when they
would run at most ``scale_down_below`` of their target) and a stabilisation window (the highest
recommendation of the last ``stabilization_s`` wins, as in the HorizontalPodAutoscaler's), and it
removes groups only from the top: a StatefulSet deletes its highest ordinals, so the planner lowers
replicas only past groups whose last heartbeat shows no running request (SIGTERM then drains each).
Groups are matched to ordinals by their advertised address, ``<statefulset>-<ordinal>.<service>...``
(the chart advertises pod DNS names when the planner is on); if a busy group cannot be matched,
no scale-down happens. Decisions are applied with ``patch_namespaced_stateful_set_scale``, logged
with their inputs, and exported as metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass, field

import redis
from prometheus_client import Counter, Gauge

from ringserve.config import RedisArgs, _opt
from ringserve.errors import InvalidArgument
from ringserve.metrics import serve_metrics
from ringserve.registry import Registry, connect, redacted
from ringserve.registry_schema import GroupRecord

log = logging.getLogger(__name__)

REPLICAS = Gauge(
    "ringserve_planner_replicas", "Planner: replicas per tier (current, recommended, desired)", ["tier", "kind"]
)
NEED = Gauge("ringserve_planner_need_groups", "Planner: groups the tier's load needs at its targets", ["tier"])
INPUTS = Gauge("ringserve_planner_input", "Planner: the load inputs of the last decision", ["tier", "input"])
DECISIONS = Counter("ringserve_planner_decisions_total", "Planner: decisions by action", ["tier", "action"])
ERRORS = Counter(
    "ringserve_planner_errors_total", "Planner: failed reads by source (redis, kubernetes, prometheus)", ["source"]
)
DEADLINES_MISSED = 'sum(rate(ringserve_prefill_deadlines_total{outcome=~"missed|rejected"}[2m]))'


@dataclass
class PlannerConfig(RedisArgs):
    """What `ringserve planner` reads, its targets and limits, and where it scales."""

    namespace: str = _opt("default", "namespace of the StatefulSets")
    prefill_statefulset: str = _opt("ringserve-prefill", "the prefill tier's StatefulSet")
    decode_statefulset: str = _opt("ringserve-decode", "the decode tier's StatefulSet")
    kubeconfig: str | None = _opt(None, "kubeconfig file; default: in cluster, with the pod's service account", str)
    interval_s: float = _opt(15.0, "seconds between decisions")
    stabilization_s: float = _opt(300.0, "a scale-down takes the highest recommendation of this many seconds")
    scale_down_below: float = _opt(
        0.7, "hysteresis: remove groups only while the rest would run at most this fraction of their target"
    )
    ttft_target_s: float = _opt(2.0, "prefill: queue time (queued prompt work per group) to stay under")
    prefill_tokens_per_s: float = _opt(10000.0, "prefill: speed assumed for a group that has not measured its own")
    decode_kv_target: float = _opt(0.8, "decode: fraction of a group's KV blocks in use to stay under")
    decode_requests_target: int = _opt(32, "decode: active requests per group to stay under")
    prefill_min: int = _opt(1, "fewest prefill groups")
    prefill_max: int = _opt(8, "most prefill groups")
    decode_min: int = _opt(1, "fewest decode groups")
    decode_max: int = _opt(8, "most decode groups")
    prometheus_url: str | None = _opt(
        None,
        "Prometheus to read missed TTFT deadlines from; default: off",
        str,
        url="set the whole URL in RINGSERVE_PROMETHEUS_URL instead",
    )
    prometheus_query: str = _opt(DEADLINES_MISSED, "PromQL: missed prefill deadlines per second (add your labels)")
    dry_run: bool = _opt(False, "log and export decisions without applying them")
    metrics_port: int | None = _opt(None, "serve Prometheus /metrics on this port", int)

    def __post_init__(self) -> None:
        for tier in ("prefill", "decode"):
            low, high = getattr(self, f"{tier}_min"), getattr(self, f"{tier}_max")
            if not 0 <= low <= high:
                raise InvalidArgument(f"--{tier}-min ({low}) and --{tier}-max ({high}) need 0 <= min <= max")
        positive = ("interval_s", "ttft_target_s", "prefill_tokens_per_s", "decode_kv_target", "decode_requests_target")
        for name in positive:
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.scale_down_below < 1:
            raise InvalidArgument(f"--scale-down-below must be in (0, 1), got {self.scale_down_below}")
        if self.stabilization_s < 0:
            raise InvalidArgument(f"--stabilization-s must be >= 0, got {self.stabilization_s}")


def prefill_need(cfg: PlannerConfig, groups: list[GroupRecord], current: int) -> tuple[float, dict[str, float]]:
    """Groups needed so queued prompt work waits at most the TTFT target, and the inputs it used."""
    work_s = sum(g.load.queued_tokens / (g.load.tokens_per_s or cfg.prefill_tokens_per_s) for g in groups)
    inputs = {
        "groups": len(groups),
        "queued_tokens": sum(g.load.queued_tokens for g in groups),
        "active_requests": sum(g.load.active_requests for g in groups),
        "predicted_queue_s": round(work_s / max(current, 1), 3),
    }
    return work_s / cfg.ttft_target_s, inputs


def decode_need(cfg: PlannerConfig, groups: list[GroupRecord], current: int) -> tuple[float, dict[str, float]]:
    """Groups needed to keep KV blocks in use and active requests per group under their targets."""
    used = sum(g.load.total_blocks - g.load.free_blocks for g in groups)
    per_group = max((g.load.total_blocks for g in groups), default=0)
    active = sum(g.load.active_requests for g in groups)
    kv_need = used / (per_group * cfg.decode_kv_target) if per_group else 0.0
    inputs = {
        "groups": len(groups),
        "kv_blocks_used": used,
        "kv_blocks_free": sum(g.load.free_blocks for g in groups),
        "active_requests": active,
    }
    return max(kv_need, active / cfg.decode_requests_target), inputs


def query_prometheus(url: str, query: str, timeout_s: float = 5.0) -> float:
    """An instant query's value: the sum of its series (0 when none), or its scalar."""
    address = f"{url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(address, timeout=timeout_s) as reply:
        answer = json.load(reply)
    if answer.get("status") != "success":
        raise ValueError(f"Prometheus answered {answer.get('errorType')}: {answer.get('error')}")
    data = answer["data"]
    if data["resultType"] == "scalar":
        return float(data["result"][1])
    return sum(float(series["value"][1]) for series in data["result"])


@dataclass
class Decision:
    """One tier's decision: replicas now, the recommendation of this step, what it scales to, and why."""

    tier: str
    current: int
    recommended: int
    desired: int
    action: str  # up, down, hold, or held_busy (a scale-down waits for running requests)
    reason: str
    need: float
    inputs: dict[str, float] = field(default_factory=dict)


class Tier:
    """One tier's StatefulSet, limits and recommendation history."""

    def __init__(self, cfg: PlannerConfig, role: str):
        self.cfg, self.role = cfg, role
        self.statefulset = getattr(cfg, f"{role}_statefulset")
        self.min, self.max = getattr(cfg, f"{role}_min"), getattr(cfg, f"{role}_max")
        self.need = prefill_need if role == "prefill" else decode_need
        self.history: deque[tuple[float, int]] = deque()
        self.last_miss_bump = -math.inf

    def ordinal(self, group: GroupRecord) -> int | None:
        """The pod ordinal in the group's advertised address (``<statefulset>-<n>.<service>...:port``)."""
        pod = group.address.rpartition(":")[0].split(".")[0]
        prefix, _, number = pod.rpartition("-")
        return int(number) if prefix == self.statefulset and number.isdigit() else None

    def recommend(self, need: float, current: int) -> int:
        """ceil(need) above the current replicas; below, the fewest that stay under scale_down_below of
        their target (hysteresis); within min/max."""
        eps = 1e-9  # need == 2.0 needs 2 groups, not 3
        if need > current:
            wanted = math.ceil(need - eps)
        else:
            wanted = min(current, math.ceil(need / self.cfg.scale_down_below - eps))
        return max(self.min, min(self.max, wanted))

    def decide(self, now: float, current: int, groups: list[GroupRecord], missed: float | None = None) -> Decision:
        """This step's decision; ``missed``: TTFT deadlines missed per second (Prometheus), if read."""
        need, inputs = self.need(self.cfg, groups, current)
        recommended = self.recommend(need, current)
        reason = f"need {need:.2f} groups"
        if missed is not None:
            inputs["deadlines_missed_per_s"] = missed
        if missed:  # no scale-down while deadlines are missed; one group more once per window
            reason += f"; TTFT deadlines missed ({missed:.3g}/s)"
            recommended = max(recommended, current)
            if now - self.last_miss_bump >= self.cfg.stabilization_s and recommended == current < self.max:
                recommended, self.last_miss_bump = current + 1, now
                reason += ": one group more"
        self.history.append((now, recommended))
        while self.history[0][0] < now - self.cfg.stabilization_s:
            self.history.popleft()
        if recommended >= current:
            action = "up" if recommended > current else "hold"
            reason = reason if action == "up" or missed else "within the hysteresis band and limits"
            return Decision(self.role, current, recommended, recommended, action, reason, need, inputs)
        desired = min(current, max(r for _, r in self.history))
        if desired == current:
            reason = f"stabilisation window ({self.cfg.stabilization_s:g} s) recommends {current}"
            return Decision(self.role, current, recommended, current, "hold", reason, need, inputs)
        return self._scale_down(current, desired, recommended, need, inputs, groups)

    def _scale_down(
        self, current: int, desired: int, recommended: int, need: float, inputs: dict, groups: list[GroupRecord]
    ) -> Decision:
        """Lower replicas from the top only past groups that run no request."""
        running: dict[int, int] = {}
        unmatched = []
        for g in groups:
            n = self.ordinal(g)
            if n is None:
                unmatched += [g.id] if g.load.active_requests else []
            else:
                running[n] = max(running.get(n, 0), g.load.active_requests)
        target = current
        while not unmatched and target > desired and running.get(target - 1, 0) == 0:
            target -= 1
        if target == current:
            busy = unmatched or [f"{self.statefulset}-{current - 1} ({running[current - 1]} running)"]
            reason = f"scale-down to {desired} waits: {', '.join(busy)} has requests running"
            return Decision(self.role, current, recommended, current, "held_busy", reason, need, inputs)
        reason = f"need {need:.2f} groups" + (f"; {self.statefulset}-{target - 1} is busy" if target > desired else "")
        return Decision(self.role, current, recommended, target, "down", reason, need, inputs)


class Scaler:
    """The StatefulSets' scale subresource through the `kubernetes` client."""

    def __init__(self, namespace: str, kubeconfig: str | None):
        from kubernetes import client, config

        if kubeconfig:
            api = config.new_client_from_config(config_file=kubeconfig)
        else:
            config.load_incluster_config()
            api = client.ApiClient()
        self.apps = client.AppsV1Api(api)
        self.namespace = namespace

    def replicas(self, statefulset: str) -> int:
        return self.apps.read_namespaced_stateful_set_scale(statefulset, self.namespace).spec.replicas

    def scale(self, statefulset: str, replicas: int) -> None:
        self.apps.patch_namespaced_stateful_set_scale(statefulset, self.namespace, {"spec": {"replicas": replicas}})


class Planner:
    """Both tiers' decisions, one step at a time."""

    def __init__(self, cfg: PlannerConfig, registry: Registry, scaler: Scaler):
        self.cfg, self.registry, self.scaler = cfg, registry, scaler
        self.tiers = [Tier(cfg, "prefill"), Tier(cfg, "decode")]

    def step(self, now: float | None = None) -> list[Decision]:
        """Read the load and the replicas, decide, apply (unless --dry-run), log and export."""
        now = time.monotonic() if now is None else now
        groups = self.registry.groups()
        missed = self._deadlines_missed()
        decisions = []
        for tier in self.tiers:
            current = self.scaler.replicas(tier.statefulset)
            d = tier.decide(
                now, current, [g for g in groups if g.role == tier.role], missed if tier.role == "prefill" else None
            )
            change = d.desired != d.current
            if change and not self.cfg.dry_run:
                self.scaler.scale(tier.statefulset, d.desired)
            log.info(
                "%s %s: %s %d -> %d (recommended %d; %s) inputs %s%s",
                tier.role,
                tier.statefulset,
                d.action,
                d.current,
                d.desired,
                d.recommended,
                d.reason,
                d.inputs,
                " [dry run: not applied]" if change and self.cfg.dry_run else "",
            )
            self._export(d)
            decisions.append(d)
        return decisions

    def _deadlines_missed(self) -> float | None:
        """Missed TTFT deadlines per second from Prometheus; None when off or unreadable (logged)."""
        if not self.cfg.prometheus_url:
            return None
        try:
            return query_prometheus(self.cfg.prometheus_url, self.cfg.prometheus_query)
        except (OSError, ValueError, KeyError, IndexError) as e:  # URLError is an OSError
            ERRORS.labels("prometheus").inc()
            log.warning("planner: no deadline signal from Prometheus at %s (%s)", self.cfg.prometheus_url, e)
            return None

    @staticmethod
    def _export(d: Decision) -> None:
        for kind in ("current", "recommended", "desired"):
            REPLICAS.labels(d.tier, kind).set(getattr(d, kind))
        NEED.labels(d.tier).set(d.need)
        for name, value in d.inputs.items():
            INPUTS.labels(d.tier, name).set(value)
        DECISIONS.labels(d.tier, d.action).inc()


def run(cfg: PlannerConfig) -> int:
    """`ringserve planner`: a step every --interval-s until stopped; a failed step is logged and retried."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    serve_metrics(cfg.metrics_port)
    planner = Planner(cfg, Registry(connect(cfg), cfg.cluster), Scaler(cfg.namespace, cfg.kubeconfig))
    log.info(
        "planner: scaling %s and %s in namespace %s every %g s%s",
        cfg.prefill_statefulset,
        cfg.decode_statefulset,
        cfg.namespace,
        cfg.interval_s,
        " (dry run)" if cfg.dry_run else "",
    )
    while True:
        started = time.monotonic()
        try:
            planner.step(started)
        except redis.RedisError as e:
            ERRORS.labels("redis").inc()
            log.warning("planner: Redis at %s unreachable (%s): no decision this step", redacted(cfg.redis_url), e)
        except ApiException as e:
            ERRORS.labels("kubernetes").inc()
            log.warning("planner: Kubernetes API answered %s %s: %s", e.status, e.reason, (e.body or "")[:300])
        except HTTPError as e:
            ERRORS.labels("kubernetes").inc()
            log.warning("planner: Kubernetes API unreachable (%s)", e)
        time.sleep(max(0.0, cfg.interval_s - (time.monotonic() - started)))
