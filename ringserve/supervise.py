"""`ringserve up`: one machine's deployment, owned by one process from start to end.

`up` checks its flags and the Redis it is given before it starts anything, then starts Redis
(embedded unless --redis-url), a decode group, a prefill group and a router, each in a process group
of its own. While they serve, a service (or the embedded Redis) that dies is restarted with backoff
and the others keep serving. It ends only on Ctrl-C or SIGTERM: the first drains every service (each
up to its drain timeout; the router is given the workers' one, so running streams are not cut
early), a second kills every process group at once. On every path, start-up included, no process it
started is left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time

from ringserve.config import DecodeConfig, RedisArgs, config_from_args
from ringserve.errors import Cancelled, InvalidArgument, Unavailable
from ringserve.launch import Cluster, start_cluster

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # delay before the 1st, 2nd, ... restart in a row
STABLE_S = 60.0  # a service that ran this long before dying starts its backoff over
SHUTDOWN_MARGIN_S = 30.0  # beyond the longest drain: servers stopping, ranks exiting
LIVENESS_EVERY_S = 5.0  # how often a running service is asked whether it gave up (ringserve.live)


class Signals:
    """Counts SIGINT/SIGTERM: ``first`` is set at the first (drain), ``second`` at the next (kill)."""

    def __init__(self):
        self.first, self.second = threading.Event(), threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.first.is_set():
            log.warning("%s again: killing everything now", signal.Signals(signum).name)
            self.second.set()
        else:
            log.info("%s: stopping (a second Ctrl-C or SIGTERM kills everything at once)", signal.Signals(signum).name)
            self.first.set()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_flags(args: argparse.Namespace) -> None:
    """Everything that needs no child process, checked before any is started."""
    if args.cp < 1 or args.kvp < 1:
        raise InvalidArgument(f"--cp and --kvp must be at least 1, got --cp {args.cp} --kvp {args.kvp}")
    if args.dtype not in DTYPES:
        raise InvalidArgument(f"--dtype {args.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if args.model and not os.path.exists(args.model):
        raise InvalidArgument(f"--model {args.model}: no such file or directory")
    from ringserve.tls import is_loopback

    if not args.insecure and not is_loopback(args.host):
        raise InvalidArgument(
            f"--host {args.host} is not a loopback address and `up` serves plaintext gRPC: add --insecure to "
            "serve it to the network anyway, or run the services with TLS flags (see README)"
        )
    ports = {"--port": args.port, "--http-port": args.http_port}
    ports |= {} if args.redis_url else {"--redis-port": args.redis_port}
    for flag, port in ports.items():
        if not 0 <= port <= 65535:
            raise InvalidArgument(f"{flag} {port} is not a TCP port (0 to 65535)")
        if port and not _port_free(args.host, port):
            raise InvalidArgument(f"{flag} {port}: {args.host}:{port} is in use (another `ringserve up`?)")
    if args.redis_url:
        _check_redis(args.redis_url)


def _check_redis(url: str) -> None:
    """Fail in seconds, not minutes, when the given Redis does not answer."""
    import redis

    from ringserve.registry import connect

    cfg = config_from_args(RedisArgs, argparse.Namespace(redis_url=url))  # password, TLS from RINGSERVE_REDIS_*
    try:
        connect(cfg, timeout_s=3.0).ping()
    except redis.RedisError as e:
        raise Unavailable(
            f"cannot reach Redis at {url} ({e}); start it, or leave out --redis-url to run an embedded one"
        ) from e


def _drain_timeout_s() -> float:
    """The workers' drain timeout, as the services will read it (flag default or RINGSERVE_DRAIN_TIMEOUT_S)."""
    return config_from_args(DecodeConfig, argparse.Namespace()).drain_timeout_s


class Supervisor:
    """Restarts what dies, with backoff, until ``stop`` is set."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.started = {name: time.monotonic() for name in cluster.procs}
        self.failures = dict.fromkeys(cluster.procs, 0)  # deaths in a row, each soon after its start
        self.due: dict[str, float] = {}  # service (or "redis") -> when to restart it
        self.starting: set[str] = set()  # restarted, not yet serving again
        self.next_liveness = time.monotonic() + LIVENESS_EVERY_S

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            for name, proc in self.cluster.procs.items():
                if proc.poll() is not None and name not in self.due:
                    self._schedule(name, f"the {name} service (pid {proc.pid}) exited with code {proc.returncode}")
            redis = self.cluster.redis
            if redis is not None and "redis" not in self.due and (redis.proc is None or redis.proc.poll() is not None):
                code = None if redis.proc is None else redis.proc.returncode
                self._schedule("redis", f"the embedded redis-server stopped (exit code {code})")
            for name, when in list(self.due.items()):
                if time.monotonic() >= when:
                    self._restart(name)
            self._check_started()
            if time.monotonic() >= self.next_liveness:
                self._check_liveness()

    def _schedule(self, name: str, what: str) -> None:
        lived = time.monotonic() - self.started.get(name, 0.0)
        self.failures[name] = 1 if lived > STABLE_S else self.failures.get(name, 0) + 1
        delay = BACKOFF_S[min(self.failures[name], len(BACKOFF_S)) - 1]
        log.error("%s; restarting it in %.0f s (restart %d in a row)", what, delay, self.failures[name])
        if name != "redis":
            self.cluster.kill(name)  # ranks the leader left behind
        self.starting.discard(name)
        self.due[name] = time.monotonic() + delay

    def _restart(self, name: str) -> None:
        del self.due[name]
        self.started[name] = time.monotonic()
        if name == "redis":
            try:
                self.cluster.redis.start()  # empty: the services re-register at their next heartbeat
            except Unavailable as e:
                self._schedule("redis", f"redis-server did not start again: {e}")
            return
        self.cluster.respawn(name)
        self.starting.add(name)

    def _check_started(self) -> None:
        from ringserve.rpc import wait_ready

        for name in list(self.starting):
            try:
                wait_ready(self.cluster.addresses[name], timeout_s=0.0)
            except TimeoutError:
                continue
            self.starting.discard(name)
            log.info("%s is serving again at %s", name, self.cluster.addresses[name])

    def _check_liveness(self) -> None:
        """Kill a service that runs but has given up (a group whose rank died): the next round
        restarts it, as Kubernetes' liveness probe would."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from ringserve.rpc import LIVE, channel

        self.next_liveness = time.monotonic() + LIVENESS_EVERY_S
        for name, proc in self.cluster.procs.items():
            if name in self.due or name in self.starting or proc.poll() is not None:
                continue
            with channel(self.cluster.addresses[name]) as ch:
                try:
                    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=LIVE), timeout=2)
                except grpc.RpcError:
                    continue  # busy or still starting: only an explicit NOT_SERVING counts
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                log.error("the %s service (pid %d) reports %s NOT_SERVING (broken): killing it", name, proc.pid, LIVE)
                self.cluster.kill(name)


def up(args: argparse.Namespace) -> int:
    """`ringserve up`: check, start, supervise until a signal, drain; see the module docstring."""
    check_flags(args)
    signals = Signals()
    drain_s = _drain_timeout_s()
    insecure = ["--insecure"] if args.insecure else []  # up runs plaintext: off loopback only when asked
    cluster = None
    try:
        cluster = start_cluster(
            cp=args.cp, kvp=args.kvp, model=args.model, dtype=args.dtype, host=args.host, router_port=args.port,
            metrics=True, redis_url=args.redis_url, redis_port=args.redis_port, name="ringserve",
            extra={
                "router": ["--drain-timeout-s", str(drain_s), "--http-port", str(args.http_port), *insecure],
                "prefill": insecure,
                "decode": insecure,
            },
            cancel=signals.first,
        )  # fmt: skip
        print(cluster.router, flush=True)
        log.info(
            "ringserve is up: router at %s, Redis at %s (Ctrl-C or SIGTERM stops everything); metrics at %s",
            cluster.router,
            cluster.redis_url,
            ", ".join(f"{k} http://{v}/metrics" for k, v in cluster.metrics.items()),
        )
        Supervisor(cluster).run(signals.first)
        log.info("stopping: waiting up to %.0f s for the services to drain", drain_s)
        cluster.stop(grace_s=drain_s + SHUTDOWN_MARGIN_S, abort=signals.second)
        return 0
    except Cancelled:
        log.info("stopped during start-up")
        return 130
    finally:
        if cluster is not None:  # after a drain, this finds nothing left; else it kills what runs
            cluster.stop(grace_s=0.0)
