"""Running the services: one per process (`ringserve router|prefill|decode`) or all at once (`up`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ringserve.config import DecodeConfig, PrefillConfig, RouterConfig
from ringserve.errors import Unavailable

log = logging.getLogger(__name__)


# Heavy imports (grpc, torch) happen inside the commands, so `ringserve --help` stays fast.


def run_decode(cfg: DecodeConfig) -> int:
    from ringserve.decode_service.server import serve
    from ringserve.service import wait_for_termination

    server, _, worker = serve(cfg)
    wait_for_termination(server, worker.close)
    return 0


def run_prefill(cfg: PrefillConfig) -> int:
    from ringserve.prefill_service.server import serve
    from ringserve.service import wait_for_termination

    server, _, group = serve(cfg)
    wait_for_termination(server, group.close)
    return 0


def run_router(cfg: RouterConfig) -> int:
    from ringserve.router.server import serve
    from ringserve.service import wait_for_termination

    server, _ = serve(cfg)
    wait_for_termination(server)
    return 0


@dataclass
class Cluster:
    """Processes of a local deployment: one decode group, one prefill group, one router."""

    router: str
    prefill: str
    decode: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)  # service -> host:port of /metrics

    def stop(self) -> None:
        """SIGTERM everyone (they shut down gracefully), then kill stragglers."""
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
) -> Cluster:
    """Start decode (KVP = ``kvp``), prefill (CP = ``cp``) and router as child processes; return
    once all serve.

    With ``metrics``, each service also serves Prometheus /metrics on a free port."""
    from ringserve.process_group import free_port
    from ringserve.rpc import wait_ready

    ports = {"decode": free_port(), "prefill": free_port(), "router": router_port or free_port()}
    metrics_ports = {name: free_port() for name in ports} if metrics else {}
    common = ["--host", host, "--dtype", dtype] + (["--model", model] if model else [])
    argv = {
        "decode": ["decode", "--port", str(ports["decode"]), "--kvp", str(kvp), *common],
        "prefill": ["prefill", "--port", str(ports["prefill"]), "--cp", str(cp), *common],
        "router": [
            "router",
            "--port",
            str(ports["router"]),
            "--host",
            host,
            "--prefill",
            f"{host}:{ports['prefill']}",
            "--decode",
            f"{host}:{ports['decode']}",
            *(["--model", model] if model else []),
        ],
    }
    for name, port in metrics_ports.items():
        argv[name] += ["--metrics-port", str(port)]
    cluster = Cluster(**{k: f"{host}:{p}" for k, p in ports.items()})
    cluster.metrics = {name: f"{host}:{port}" for name, port in metrics_ports.items()}
    try:
        for name in ("decode", "prefill", "router"):
            args = [sys.executable, "-m", "ringserve.cli", *argv[name], *(extra or {}).get(name, [])]
            out = open(os.path.join(log_dir, f"{name}.log"), "w") if log_dir else None  # noqa: SIM115
            cluster.procs[name] = subprocess.Popen(args, stderr=out or None, stdout=out or subprocess.DEVNULL)
            log.info("started %s (pid %d): %s", name, cluster.procs[name].pid, " ".join(args[3:]))
        deadline = time.monotonic() + ready_timeout_s
        for name in ("decode", "prefill", "router"):
            address = getattr(cluster, name)
            while True:
                if cluster.procs[name].poll() is not None:
                    raise Unavailable(
                        f"the {name} service exited with code {cluster.procs[name].returncode} "
                        "during start-up; see its log above"
                    )
                try:
                    wait_ready(address, timeout_s=1.0)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise Unavailable(
                            f"the {name} service did not become ready within {ready_timeout_s:.0f} s"
                        ) from None
            log.info("%s ready at %s", name, address)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def up(cp: int, kvp: int, model: str | None, dtype: str, host: str, port: int) -> int:
    """`ringserve up`: start everything, print the router's address, stop all on Ctrl-C."""
    cluster = start_cluster(cp=cp, kvp=kvp, model=model, dtype=dtype, host=host, router_port=port, metrics=True)
    print(cluster.router, flush=True)
    log.info(
        "ringserve is up: router at %s (Ctrl-C stops everything); metrics at %s",
        cluster.router,
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

    p = sub.add_parser("up", help="start a router, a prefill group and a decode worker on this machine")
    p.add_argument("--cp", type=int, default=2, help="context-parallel ranks in the prefill group")
    p.add_argument("--kvp", type=int, default=1, help="KV-parallel ranks in the decode group")
    p.add_argument("--model", default=None, help="HF directory or .gguf; default: the embedded SmolLM2-135M")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--host", default="127.0.0.1", help="address every service listens on")
    p.add_argument("--port", type=int, default=50050, help="the router's port")
    p.set_defaults(func=lambda a: up(a.cp, a.kvp, a.model, a.dtype, a.host, a.port), role="up")
