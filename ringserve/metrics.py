"""Prometheus metrics shared by every service; each process serves its own on --metrics-port."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter(
    "ringserve_requests_total", "Finished RPCs by service, method and status", ["service", "method", "status"]
)
TTFT = Histogram(
    "ringserve_time_to_first_token_seconds",
    "Router: request start to first token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TPOT = Histogram(
    "ringserve_time_per_output_token_seconds",
    "Router: mean time per token after the first",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
QUEUE_DEPTH = Gauge("ringserve_queue_depth", "Requests admitted and not yet finished", ["service"])
KV_BLOCKS = Gauge("ringserve_kv_blocks", "KV cache blocks by state", ["service", "state"])
KV_BYTES = Counter("ringserve_kv_transfer_bytes_total", "KV bytes moved between tiers", ["service", "direction"])
KV_DROPPED = Counter(
    "ringserve_kv_dropped_total", "KV frames, connections and notices the decode side refused or ignored", ["reason"]
)


PREFILL_QUEUE = Gauge("ringserve_prefill_requests", "Prefill group: requests queued or being prefilled")
PREFILL_PASS_SECONDS = Histogram(
    "ringserve_prefill_pass_seconds",
    "Prefill group: forward time of one scheduler pass (the slowest rank's)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PREFILL_CHUNK_TOKENS = Histogram(
    "ringserve_prefill_chunk_tokens",
    "Prefill group: tokens of one request computed in one pass",
    buckets=(64, 256, 1024, 4096, 16384, 65536, 262144, 1048576),
)
PREFILL_DEADLINES = Counter(
    "ringserve_prefill_deadlines_total",
    "Prefill group: requests by time-to-first-token deadline outcome (met, missed, rejected)",
    ["outcome"],
)


def serve_metrics(port: int | None) -> None:
    """Expose /metrics over HTTP when a port is given (0 picks a free one)."""
    if port is not None:
        start_http_server(port)


REDIS_UP = Gauge("ringserve_redis_up", "1 while this process reaches Redis, 0 while it does not", ["service"])
ROUTER_GROUPS = Gauge("ringserve_router_groups", "Groups the router knows from the registry", ["role"])
ROUTER_DECISIONS = Counter(
    "ringserve_router_decisions_total",
    "Routing decisions by the policy that made them (least_loaded_fallback: Redis unreachable)",
    ["policy"],
)
ROUTER_DECISION_SECONDS = Histogram(
    "ringserve_router_decision_seconds",
    "Router: picking a prefill and a decode group (the Redis round trip included)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
