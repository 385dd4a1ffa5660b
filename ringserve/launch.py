"""Running the services: one per process (`ringserve router|prefill|decode`), or all at once as a
``Cluster`` of child processes (tests, benchmarks, and `up`, supervised in supervise.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ringserve.config import DecodeConfig, PrefillConfig, RouterConfig, WorkerArgs
from ringserve.errors import Cancelled, FailedPrecondition, InvalidArgument, Unavailable
from ringserve.process_group import free_port
from ringserve.redis_server import EmbeddedRedis

if TYPE_CHECKING:
    from ringserve.tls import ChannelTls

log = logging.getLogger(__name__)


# Heavy imports (grpc, torch) happen inside the commands, so `ringserve --help` stays fast.


def run_decode(cfg: DecodeConfig) -> int:
    if cfg.group_rank is not None:
        from ringserve.decode_service.group import rank_main

        return run_rank(cfg, "decode", cfg.kvp, rank_main)
    from ringserve.decode_service.server import serve
    from ringserve.service import wait_for_termination

    server, _, worker, drain = serve(cfg)
    wait_for_termination(server, worker.close, drain)
    return 0


def run_prefill(cfg: PrefillConfig) -> int:
    if cfg.group_rank is not None:
        from ringserve.prefill_service.rank import rank_main

        return run_rank(cfg, "prefill", cfg.cp, rank_main)
    from ringserve.prefill_service.server import serve
    from ringserve.service import wait_for_termination

    server, _, group, drain = serve(cfg)
    wait_for_termination(server, group.close, drain)
    return 0


# What a rank on another host takes from its own command line; the rest of its configuration is
# the leader's (sent when it joins), so the group agrees on sizes, blocks and transport.
HOST_LOCAL_FIELDS = ("model", "device", "host", "advertise_host", "kv_port", "deployment_secret_file", "metrics_port")


def run_rank(cfg: WorkerArgs, role: str, outer: int, rank_main: Callable) -> int:
    """`ringserve prefill|decode --group-rank R --group-leader HOST:PORT [--local-ranks L]`: run the
    R-th block of L consecutive ranks of the group whose leader listens there (world ranks R*L ..
    R*L+L-1 of TP x ``outer``; L = 1: rank R), one process each (this one and L-1 children) on
    this host's devices 0..L-1, until the leader hangs up (or dies). With L = --tp, a host runs one
    CP (or KVP) rank's TP group, as the leader's host (--local-ranks L) runs the first."""
    import functools

    from ringserve.kv_transfer.secret import deployment_secret
    from ringserve.rank_link import join_group, link_key, spawn_ranks

    world, n = cfg.tp * outer, 1 if cfg.local_ranks is None else cfg.local_ranks
    if not cfg.group_leader:
        raise InvalidArgument(f"--group-rank needs --group-leader HOST:PORT (the {role} leader's rank link)")
    first = cfg.group_rank * n
    if cfg.group_rank < 1 or n < 1 or first + n > world:
        raise InvalidArgument(
            f"--group-rank {cfg.group_rank} with --local-ranks {n} names ranks {first}..{first + n - 1}, "
            f"outside ranks 1..{world - 1} of this group of {world} (--tp {cfg.tp} x {outer})"
        )
    secret = deployment_secret(cfg.deployment_secret_file)
    if secret is None:
        raise FailedPrecondition(
            "a rank that joins its leader over the network needs the deployment secret "
            "(--deployment-secret-file or RINGSERVE_DEPLOYMENT_SECRET, the leader's): it keys the rank link"
        )
    devices = host_devices(cfg.device, n)
    own = {f: getattr(cfg, f) for f in HOST_LOCAL_FIELDS if hasattr(cfg, f)}
    key = link_key(secret)
    address = cfg.group_leader
    targets = [(first + i, functools.partial(_joined, role, address, own, devices[i], rank_main)) for i in range(1, n)]
    children = spawn_ranks(role, world, address, key, targets, cfg.group_timeout_s)
    try:
        link = join_group(address, first, world, key, cfg.group_timeout_s)
        try:
            _joined(role, address, own, devices[0], rank_main, link)
        finally:
            link.close()
    except BaseException:
        for proc in children:  # this rank did not join, or failed: the group is broken; end this host's ranks too
            proc.kill()
        raise
    finally:
        for proc in children:  # they end when the leader hangs up, as this rank did
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failed = [f"{p.name} (exit code {p.exitcode})" for p in children if p.exitcode]
    if failed:
        raise Unavailable(f"{role} ranks {', '.join(failed)} of this host failed; see their log lines")
    return 0


def host_devices(device: str, n: int) -> list:
    """The devices of a host's ``n`` ranks: ``device`` itself for one, this host's GPUs 0..n-1 for
    several (``cuda``), or the CPU for each; checked before any rank starts."""
    from ringserve.service import check_device

    dev = check_device(device)
    if n == 1 or dev.type == "cpu":
        return [dev] * n
    if dev.index is not None:
        raise InvalidArgument(f"--device {device} names one GPU, but --local-ranks {n} runs a rank on each of {n}")
    return [check_device(f"cuda:{i}") for i in range(n)]


def _joined(role: str, address: str, own: dict, device, rank_main: Callable, link) -> None:
    """One joined rank: its own host's settings over the leader's config, then ``rank_main``."""
    import dataclasses

    link.welcome = dataclasses.replace(link.welcome, config=dataclasses.replace(link.config, **own))
    init = link.welcome.init_method
    log.info("%s rank %d joined its leader at %s (torch.distributed at %s)", role, link.rank, address, init)
    rank_main(link, device)
    log.info("%s rank %d: the leader hung up; exiting", role, link.rank)


def run_router(cfg: RouterConfig) -> int:
    from ringserve.router.server import serve
    from ringserve.service import wait_for_termination

    server, _, balancer = serve(cfg)
    wait_for_termination(server, balancer.close, grace_s=cfg.drain_timeout_s)
    return 0


@dataclass
class Cluster:
    """Processes of a local deployment: one decode group, one prefill group and one router at first,
    all registered in one Redis under one cluster name; ``add`` starts more groups.

    Each service runs in a process group of its own (its ranks included), so stopping one kills all
    of it, and a Ctrl-C at the terminal reaches only the process that owns the cluster, which then
    decides how they stop (``stop``)."""

    router: str
    prefill: str
    decode: str
    redis_url: str
    name: str  # the cluster name: the services' key namespace in Redis
    host: str = "127.0.0.1"
    log_dir: str | None = None
    redis: EmbeddedRedis | None = None  # the embedded Redis, when the cluster started its own
    cancel: threading.Event | None = None  # set: stop waiting for services to become ready
    tls: ChannelTls | None = None  # for health checks, when the services run TLS
    role_flags: dict[str, list[str]] = field(default_factory=dict)  # role -> flags each of its services gets
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    argv: dict[str, list[str]] = field(default_factory=dict)  # service -> its full command line
    addresses: dict[str, str] = field(default_factory=dict)  # service -> gRPC address
    metrics: dict[str, str] = field(default_factory=dict)  # service -> host:port of /metrics

    def spawn(self, name: str, argv: list[str], metrics: bool = False, port: int = 0) -> str:
        """Start service ``name`` (``argv``: a `ringserve` command and its flags, without --port,
        --host, --redis-url or --cluster) as a child process; returns its gRPC address."""
        port = port or free_port()
        args = [sys.executable, "-m", "ringserve.cli", *argv, *self.role_flags.get(argv[0], [])]
        args += ["--port", str(port), "--host", self.host]
        args += ["--redis-url", self.redis_url, "--cluster", self.name]
        if metrics:
            self.metrics[name] = f"{self.host}:{free_port()}"
            args += ["--metrics-port", self.metrics[name].rsplit(":", 1)[1]]
        self.argv[name] = args
        self.addresses[name] = f"{self.host}:{port}"
        self.respawn(name)
        return self.addresses[name]

    def respawn(self, name: str) -> None:
        """(Re)start service ``name`` with the command line it was spawned with, logging to its log."""
        out = open(os.path.join(self.log_dir, f"{name}.log"), "a") if self.log_dir else None  # noqa: SIM115
        args = self.argv[name]
        self.procs[name] = subprocess.Popen(
            args, stderr=out or None, stdout=out or subprocess.DEVNULL, start_new_session=True
        )
        if out:
            out.close()  # the child has its own copy
        log.info("started %s (pid %d): %s", name, self.procs[name].pid, " ".join(args[3:]))

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
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled(f"start-up interrupted while waiting for the {name} service")
            try:
                wait_ready(self.addresses[name], timeout_s=1.0, tls=self.tls)
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

    def kill(self, name: str) -> None:
        """SIGKILL service ``name``'s whole process group: its leader and every rank it started."""
        try:
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone already
        self.procs[name].wait()

    def stop(self, grace_s: float = 15.0, abort: threading.Event | None = None) -> None:
        """SIGTERM every service (they drain and shut down), wait up to ``grace_s`` (or until
        ``abort`` is set), then SIGKILL every process group, finished or not, so no rank outlives
        its service; stop Redis last (draining workers deregister there)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in self.procs.values()) and time.monotonic() < deadline:
            if abort is not None and abort.is_set():
                break
            time.sleep(0.1)
        running = [name for name, p in self.procs.items() if p.poll() is None]
        if running:
            log.warning("killing %s: still running %.0f s after SIGTERM", ", ".join(running), grace_s)
        for name in self.procs:
            self.kill(name)
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
    cancel: threading.Event | None = None,
    tls: ChannelTls | None = None,
    role_flags: dict[str, list[str]] | None = None,
) -> Cluster:
    """Start decode (KVP = ``kvp``), prefill (CP = ``cp``) and router as child processes; return
    once all serve.

    They register in Redis at ``redis_url``, or in an embedded Redis started here on ``redis_port``
    (0: a free one; stopped with the cluster), under cluster ``name`` (default: a fresh one, so
    clusters can share a Redis). Setting ``cancel`` interrupts the start-up (``Cancelled``).
    With ``metrics``, each service also serves Prometheus /metrics on a free port. Services that run
    TLS (their flags in ``extra``, or in ``role_flags``: role -> flags every service of it gets, those
    ``Cluster.add`` starts too) are health-checked over ``tls``."""
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
    name = name or f"local-{uuid.uuid4().hex[:8]}"
    cluster = Cluster("", "", "", redis_url, name, host, log_dir, redis, cancel, tls, role_flags or {})
    try:
        for service in ("decode", "prefill", "router"):
            port = router_port if service == "router" else 0
            address = cluster.spawn(service, argv[service] + (extra or {}).get(service, []), metrics, port)
            setattr(cluster, service, address)
        for service in ("decode", "prefill", "router"):
            cluster.wait_ready(service, ready_timeout_s)
    except BaseException:
        cluster.stop(grace_s=5.0)
        raise
    return cluster


def add_service_commands(sub) -> None:
    """`ringserve router|prefill|decode`: each flag can also be set by its RINGSERVE_* variable
    (`ringserve up` is in supervise.py)."""
    from ringserve.config import add_config_args, config_from_args

    def service(name: str, cls, run, help_text: str) -> None:
        p = sub.add_parser(name, help=help_text)
        add_config_args(p, cls)
        p.set_defaults(func=lambda args: run(config_from_args(cls, args)), role=name)

    service("decode", DecodeConfig, run_decode, "run a decode group: this process leads, ranks 1..K-1 are children")
    service("prefill", PrefillConfig, run_prefill, "run a prefill group: this process leads, ranks 1..N-1 are children")
    service("router", RouterConfig, run_router, "run the client-facing router")
