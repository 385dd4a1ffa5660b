"""Running the services: one per process (`ringserve router|prefill|decode`) or all at once (`up`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

from ringserve.config import DecodeConfig, PrefillConfig, RouterConfig
from ringserve.errors import Unavailable
from ringserve.process_group import free_port
from ringserve.redis_server import EmbeddedRedis

log = logging.getLogger(__name__)


# Heavy imports (grpc, torch) happen inside the commands, so `ringserve --help` stays fast.


def run_decode(cfg: DecodeConfig) -> int:
    from ringserve.decode_service.server import serve
    from ringserve.service import wait_for_termination

    server, _, worker, drain = serve(cfg)
    wait_for_termination(server, worker.close, drain)
    return 0


def run_prefill(cfg: PrefillConfig) -> int:
    from ringserve.prefill_service.server import serve
    from ringserve.service import wait_for_termination

    server, _, group, drain = serve(cfg)
    wait_for_termination(server, group.close, drain)
    return 0


def run_router(cfg: RouterConfig) -> int:
    from ringserve.router.server import serve
    from ringserve.service import wait_for_termination

    server, _, balancer = serve(cfg)
    wait_for_termination(server, balancer.close, grace_s=cfg.drain_timeout_s)
    return 0


@dataclass
class Cluster:
    """Processes of a local deployment: one decode group, one prefill group and one router at first,
    all registered in one Redis under one cluster name; ``add`` starts more groups."""

    router: str
    prefill: str
    decode: str
    redis_url: str
    name: str  # the cluster name: the services' key namespace in Redis
    host: str = "127.0.0.1"
    log_dir: str | None = None
    redis: EmbeddedRedis | None = None  # the embedded Redis, when the cluster started its own
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)  # service -> gRPC address
    metrics: dict[str, str] = field(default_factory=dict)  # service -> host:port of /metrics

    def spawn(self, name: str, argv: list[str], metrics: bool = False, port: int = 0) -> str:
        """Start service ``name`` (``argv``: a `ringserve` command and its flags, without --port,
        --host, --redis-url or --cluster) as a child process; returns its gRPC address."""
        port = port or free_port()
        args = [sys.executable, "-m", "ringserve.cli", *argv, "--port", str(port), "--host", self.host]
        args += ["--redis-url", self.redis_url, "--cluster", self.name]
        if metrics:
            self.metrics[name] = f"{self.host}:{free_port()}"
            args += ["--metrics-port", self.metrics[name].rsplit(":", 1)[1]]
        out = open(os.path.join(self.log_dir, f"{name}.log"), "w") if self.log_dir else None  # noqa: SIM115
        self.procs[name] = subprocess.Popen(args, stderr=out or None, stdout=out or subprocess.DEVNULL)
        self.addresses[name] = f"{self.host}:{port}"
        log.info("started %s (pid %d): %s", name, self.procs[name].pid, " ".join(args[3:]))
        return self.addresses[name]

    def wait_ready(self, name: str, timeout_s: float) -> None:
        """Return once service ``name`` answers health checks; raise if it exits or takes too long."""
        from ringserve.rpc import wait_ready

        deadline = time.monotonic() + timeout_s
        while True:
            if self.procs[name].poll() is not None:
                raise Unavailable(
                    f"the {name} service exited with code {self.procs[name].returncode} during start-up; "
                    "see its log above"
                )
            try:
                wait_ready(self.addresses[name], timeout_s=1.0)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise Unavailable(f"the {name} service did not become ready within {timeout_s:.0f} s") from None
        log.info("%s ready at %s", name, self.addresses[name])

    def add(self, name: str, argv: list[str], metrics: bool = False, ready_timeout_s: float = 300.0) -> str:
        """Start one more service (e.g. a second prefill group) and wait until it serves."""
        address = self.spawn(name, argv, metrics)
        self.wait_ready(name, ready_timeout_s)
        return address

    def stop(self) -> None:
        """SIGTERM everyone (they drain and shut down gracefully), then kill stragglers; stop Redis."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.redis is not None:
            self.redis.stop()


def start_cluster(
    cp: int = 2,
    kvp: int = 1,
    model: str | None = None,
    dtype: str = "float32",
    host: str = "127.0.0.1",
    router_port: int = 0,
    extra: dict[str, list[str]] | None = None,
    ready_timeout_s: float = 300.0,
    log_dir: str | None = None,
    metrics: bool = False,
    redis_url: str | None = None,
    redis_port: int = 0,
    name: str | None = None,
) -> Cluster:
    """Start decode (KVP = ``kvp``), prefill (CP = ``cp``) and router as child processes; return
    once all serve.

    They register in Redis at ``redis_url``, or in an embedded Redis started here on ``redis_port``
    (0: a free one; stopped with the cluster), under cluster ``name`` (default: a fresh one, so
    clusters can share a Redis).
    With ``metrics``, each service also serves Prometheus /metrics on a free port."""
    redis = None
    if redis_url is None:
        log_path = os.path.join(log_dir, "redis.log") if log_dir else None
        redis = EmbeddedRedis(host, redis_port, log_path=log_path).start()
        redis_url = redis.url
    common = ["--dtype", dtype] + (["--model", model] if model else [])
    argv = {
        "decode": ["decode", "--kvp", str(kvp), *common],
        "prefill": ["prefill", "--cp", str(cp), *common],
        "router": ["router", *(["--model", model] if model else [])],
    }
    cluster = Cluster("", "", "", redis_url, name or f"local-{uuid.uuid4().hex[:8]}", host, log_dir, redis)
    try:
        for service in ("decode", "prefill", "router"):
            port = router_port if service == "router" else 0
            address = cluster.spawn(service, argv[service] + (extra or {}).get(service, []), metrics, port)
            setattr(cluster, service, address)
        for service in ("decode", "prefill", "router"):
            cluster.wait_ready(service, ready_timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def up(
    cp: int, kvp: int, model: str | None, dtype: str, host: str, port: int, redis_url: str | None, redis_port: int,
    http_port: int,
) -> int:  # fmt: skip
    """`ringserve up`: start Redis (embedded unless ``redis_url``), the groups and the router (its
    OpenAI-compatible HTTP API on ``http_port``); print the router's address; stop all on Ctrl-C."""
    cluster = start_cluster(
        cp=cp, kvp=kvp, model=model, dtype=dtype, host=host, router_port=port, metrics=True,
        redis_url=redis_url, redis_port=redis_port, name="ringserve", extra={"router": ["--http-port", str(http_port)]},
    )  # fmt: skip
    print(cluster.router, flush=True)

    def terminate(*_):  # SIGTERM stops everything as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    log.info(
        "ringserve is up: router at %s, Redis at %s (Ctrl-C or SIGTERM stops everything); metrics at %s",
        cluster.router,
        cluster.redis_url,
        ", ".join(f"{k} http://{v}/metrics" for k, v in cluster.metrics.items()),
    )
    try:
        while True:
            for name, p in cluster.procs.items():
                if p.poll() is not None:
                    log.error("the %s service exited with code %d; stopping the others", name, p.returncode)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the shutdown short
        cluster.stop()


def add_service_commands(sub) -> None:
    """`ringserve up|router|prefill|decode`: each flag can also be set by its RINGSERVE_* variable."""
    from ringserve.config import add_config_args, config_from_args

    def service(name: str, cls, run, help_text: str) -> None:
        p = sub.add_parser(name, help=help_text)
        add_config_args(p, cls)
        p.set_defaults(func=lambda args: run(config_from_args(cls, args)), role=name)

    service("decode", DecodeConfig, run_decode, "run a decode group: this process leads, ranks 1..K-1 are children")
    service("prefill", PrefillConfig, run_prefill, "run a prefill group: this process leads, ranks 1..N-1 are children")
    service("router", RouterConfig, run_router, "run the client-facing router")

    p = sub.add_parser("up", help="start Redis, a prefill group, a decode group and a router on this machine")
    p.add_argument("--cp", type=int, default=2, help="context-parallel ranks in the prefill group")
    p.add_argument("--kvp", type=int, default=1, help="KV-parallel ranks in the decode group")
    p.add_argument("--model", default=None, help="HF directory or .gguf; default: the embedded SmolLM2-135M")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--host", default="127.0.0.1", help="address every service listens on")
    p.add_argument("--port", type=int, default=50050, help="the router's port")
    p.add_argument("--http-port", type=int, default=8000, help="the OpenAI-compatible HTTP API's port (default 8000)")
    p.add_argument("--redis-url", default=None, help="use this Redis (rediss:// for TLS; its password in "
                   "RINGSERVE_REDIS_PASSWORD); default: start an embedded redis-server")  # fmt: skip
    p.add_argument("--redis-port", type=int, default=6379, help="port of the embedded Redis (0: a free one); "
                   "6379 lets services started by hand with default flags join")  # fmt: skip
    p.set_defaults(
        func=lambda a: up(a.cp, a.kvp, a.model, a.dtype, a.host, a.port, a.redis_url, a.redis_port, a.http_port),
        role="up",
    )
