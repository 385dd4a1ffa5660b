"""Start-up pieces every service process shares: dtype and device checks, a worker's gRPC server
with its registration and drain (``serve_worker``), waiting for SIGTERM."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ringserve.config import WorkerArgs
from ringserve.errors import FailedPrecondition, InvalidArgument

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidArgument(f"dtype {name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_device(device: str) -> torch.device:
    """The device, or a clear error if this machine cannot run on it (checked before any load)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise InvalidArgument(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"--device {device}: ringserve runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FailedPrecondition(f"--device {device} asked for but no CUDA GPU is visible; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FailedPrecondition(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return dev


def wait_for_termination(server, on_stop=None, drain=None, grace_s: float = 2.0) -> None:
    """Serve until SIGTERM or SIGINT; then drain (a worker's ``drain.Drain``), stop the server (refusing
    new RPCs, letting running ones finish for ``grace_s``), on_stop."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if drain:
        drain()
    server.stop(grace=grace_s).wait()
    if on_stop:
        on_stop()


@dataclass(frozen=True)
class WorkerService:
    """What a prefill or decode group serves over gRPC, and how it reports itself to the registry."""

    role: str  # "prefill" or "decode"
    degree: int  # the group's ranks
    add_servicer: Callable  # the generated add_..._to_server
    servicer: object
    service_name: str  # e.g. "ringserve.v1.Decode"
    admits: str  # the method that takes new work: refused while draining
    load: Callable  # -> registry_schema.Load, at every heartbeat
    changes: Callable | None = None  # -> (stored, evicted) block hashes, for residency


def serve_worker(cfg: WorkerArgs, service: WorkerService):
    """Start a group leader's gRPC server (behind its drain gate) and metrics, register the group in
    Redis; returns (server, port, address, drain)."""
    from ringserve.drain import Drain, DrainGate
    from ringserve.heartbeat import Registration
    from ringserve.metrics import serve_metrics
    from ringserve.registry import advertised_address
    from ringserve.rpc import start_server

    gate = DrainGate(f"{service.role} group", [f"/{service.service_name}/{service.admits}"])
    server, port, health = start_server(
        [(service.add_servicer, service.servicer)],
        [service.service_name],
        cfg.host,
        cfg.port,
        interceptors=[gate],
        limits=cfg,
    )
    serve_metrics(cfg.metrics_port)
    address = advertised_address(cfg.host, cfg.advertise_host, port)
    registration = Registration(cfg, service.role, service.degree, cfg.block_size, service.load, service.changes)
    drain = Drain(registration.start(address), gate, health, cfg.drain_timeout_s)
    return server, port, address, drain
