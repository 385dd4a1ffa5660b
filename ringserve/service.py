"""Start-up pieces every service process shares: dtype and device checks, waiting for SIGTERM."""

from __future__ import annotations

import signal
import threading

import torch

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
