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
import shlex
import signal
import socket
import threading
import time

from ringserve.cli import DTYPES
from ringserve.config import (
    DecodeConfig,
    PrefillConfig,
    RedisArgs,
    RouterConfig,
    add_config_args,
    config_from_args,
    url_without_password,
)
from ringserve.errors import Cancelled, InvalidArgument, Unavailable
from ringserve.launch import Cluster, start_cluster

log = logging.getLogger(__name__)

# Both tiers on one GPU: the prefill group gets this share of `up`'s --gpu-memory-fraction, the decode
# group the rest (decode holds every running request's KV; prefill only the prompts in flight and its
# prefix cache).
PREFILL_SHARE = 0.4
PASSED = {"prefill": PrefillConfig, "decode": DecodeConfig, "router": RouterConfig}
# Flags `up` sets itself on every service it starts: not for --prefill-args and the like.
OWNED_FLAGS = ("--port", "--host", "--redis-url", "--cluster", "--metrics-port", "--cp", "--kvp", "--tp", "--model")
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
    if args.cp < 1 or args.kvp < 1 or args.tp < 1:
        raise InvalidArgument(
            f"--cp, --kvp and --tp must be at least 1, got --cp {args.cp} --kvp {args.kvp} --tp {args.tp}"
        )
    if args.dtype not in DTYPES:
        raise InvalidArgument(f"--dtype {args.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if args.model and not os.path.exists(args.model):
        raise InvalidArgument(f"--model {args.model}: no such file or directory")
    if not 0 < args.gpu_memory_fraction <= 1:
        raise InvalidArgument(f"--gpu-memory-fraction must be in (0, 1], got {args.gpu_memory_fraction}")
    for service in PASSED:
        _check_passed(service, getattr(args, f"{service}_args"))
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


def _check_passed(service: str, text: str) -> None:
    """``--{service}-args``: flags of `ringserve {service}`, checked by its own parser before anything starts."""
    flag = f"--{service}-args"
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise InvalidArgument(f"{flag} {text!r}: {e}") from e
    owned = [a for a in argv if a.split("=")[0] in OWNED_FLAGS]
    if owned:
        raise InvalidArgument(f"{flag}: {', '.join(owned)} is set by `up` itself; use up's own flag")
    p = argparse.ArgumentParser(prog=f"ringserve {service}", exit_on_error=False)
    add_config_args(p, PASSED[service])
    try:
        _, unknown = p.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise InvalidArgument(f"{flag}: {e}") from e
    if unknown:
        raise InvalidArgument(f"{flag}: `ringserve {service}` has no flag {' '.join(unknown)} (see its --help)")


def split_fraction(fraction: float) -> tuple[float, float]:
    """`up`'s --gpu-memory-fraction as the prefill group's and the decode group's shares of the GPU."""
    prefill = round(fraction * PREFILL_SHARE, 4)
    return prefill, round(fraction - prefill, 4)


def service_flags(args: argparse.Namespace) -> dict[str, list[str]]:
    """The flags `up` adds to each service's command line: the model settings to both groups, each
    group's share of the GPU, then the user's own ``--{service}-args`` (last, so they win)."""
    model = ["--device", args.device, "--load-format", args.load_format]
    prefill_fraction, decode_fraction = split_fraction(args.gpu_memory_fraction)
    return {
        "prefill": [*model, "--gpu-memory-fraction", str(prefill_fraction), *shlex.split(args.prefill_args)],
        "decode": [*model, "--gpu-memory-fraction", str(decode_fraction), *shlex.split(args.decode_args)],
        "router": shlex.split(args.router_args),
    }


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


def _drain_timeout_s(args: argparse.Namespace) -> float:
    """The workers' drain timeout, as the services will read it (--decode-args, RINGSERVE_DRAIN_TIMEOUT_S or
    the default). Read from the flags alone: a whole DecodeConfig would size a KV pool on the GPU here."""
    p = argparse.ArgumentParser()
    p.add_argument("--drain-timeout-s", type=float, default=None)
    given = p.parse_known_args(shlex.split(args.decode_args))[0].drain_timeout_s
    if given is not None:
        return given
    env = os.environ.get("RINGSERVE_DRAIN_TIMEOUT_S")
    return float(env) if env else DecodeConfig.__dataclass_fields__["drain_timeout_s"].default


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
    drain_s = _drain_timeout_s(args)
    insecure = ["--insecure"] if args.insecure else []  # up runs plaintext: off loopback only when asked
    passed = service_flags(args)
    log.info(
        "device %s: on a GPU both tiers share it, prefill %g and decode %g of its memory (--gpu-memory-fraction %g)",
        args.device, *split_fraction(args.gpu_memory_fraction), args.gpu_memory_fraction,
    )  # fmt: skip
    cluster = None
    try:
        cluster = start_cluster(
            cp=args.cp, kvp=args.kvp, model=args.model, dtype=args.dtype, host=args.host, router_port=args.port,
            metrics=True, redis_url=args.redis_url, redis_port=args.redis_port, name="ringserve",
            extra={
                "router": ["--drain-timeout-s", str(drain_s), "--http-port", str(args.http_port), *insecure,
                           *passed["router"]],
                "prefill": ["--tp", str(args.tp), *insecure, *passed["prefill"]],
                "decode": ["--tp", str(args.tp), *insecure, *passed["decode"]],
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


_PASSWORD_INSTEAD = "give it in RINGSERVE_REDIS_PASSWORD or the file named by RINGSERVE_REDIS_PASSWORD_FILE"


def add_up_command(sub) -> None:
    """`ringserve up`: its own flags, and each service's flags passed through (--prefill-args etc.)."""
    p = sub.add_parser(
        "up",
        help="start Redis, a prefill group, a decode group and a router on this machine; restart any that dies",
    )
    p.add_argument("--cp", type=int, default=2, help="context-parallel ranks in the prefill group")
    p.add_argument("--kvp", type=int, default=1, help="KV-parallel ranks in the decode group")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per CP and per KVP rank (both groups: "
                   "tp x cp and tp x kvp processes); the model's heads and MLP width must split over them")  # fmt: skip
    p.add_argument("--model", default=None, help="HF directory or .gguf; default: the embedded SmolLM2-135M")
    p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible, else cpu), cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16 "
                   "or float16")  # fmt: skip
    p.add_argument("--load-format", default="auto", help="auto, or dummy: random weights of --model's shape")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.9, help="share of the GPU's memory both tiers "
                   f"use together (weights, working memory, KV pools): prefill {PREFILL_SHARE:g} of it, decode "
                   "the rest")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address every service listens on")
    p.add_argument("--port", type=int, default=50050, help="the router's port")
    p.add_argument("--insecure", action="store_true", help="allow --host off loopback: up serves plaintext gRPC")
    p.add_argument("--http-port", type=int, default=8000, help="the OpenAI-compatible HTTP API's port (default 8000)")
    p.add_argument("--redis-url", default=None, type=url_without_password("--redis-url", _PASSWORD_INSTEAD),
                   help="use this Redis (rediss:// for TLS; its password in RINGSERVE_REDIS_PASSWORD or the file "
                   "named by RINGSERVE_REDIS_PASSWORD_FILE, never in the URL); default: start an embedded "
                   "redis-server")  # fmt: skip
    p.add_argument("--redis-port", type=int, default=6379, help="port of the embedded Redis (0: a free one); "
                   "6379 lets services started by hand with default flags join")  # fmt: skip
    examples = {"prefill": "--target-pass-s 0.5", "decode": "--max-batch 128", "router": "--policy least_loaded"}
    for service in PASSED:
        p.add_argument(f"--{service}-args", default="", help=f"more flags for `ringserve {service}`, as one string "
                       f"(e.g. '{examples[service]}'; see `ringserve {service} --help`)")  # fmt: skip
    p.set_defaults(func=up, role="up")
