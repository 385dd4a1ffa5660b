"""Draining a worker on SIGTERM: leave the registry, refuse new work, let running requests finish.

New work is the RPCs that start a request on the worker (Prefill.Prefill, Decode.Reserve); they
answer UNAVAILABLE with a message saying so, and the router retries them on another group. Calls
that continue a request already admitted (the Decode stream of a reservation, Release, GetInfo,
health checks) keep working until the request is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from ringserve.heartbeat import Registration
from ringserve.rpc import READY, HealthServicer, refuse

log = logging.getLogger(__name__)


class DrainGate:
    """The check (a ``rpc.CallCheck``) around the unary RPCs that admit new work: counts the ones
    running and, once closed, refuses new ones with UNAVAILABLE."""

    def __init__(self, what: str, methods: list[str]):
        self.what = what  # e.g. "prefill group": names the worker in the refusal
        self.methods = frozenset(methods)  # full names, e.g. "/ringserve.v1.Prefill/Prefill"
        self.lock = threading.Lock()
        self.closed = False
        self.running = 0

    def close(self) -> None:
        """From now on, refuse new work."""
        with self.lock:
            self.closed = True

    def guards(self, method: str, streaming: bool) -> bool:
        return method in self.methods

    @contextlib.contextmanager
    def admit(self, method: str, context: grpc.ServicerContext):
        with self.lock:  # the check and the count are one step, so close() then running == 0 is final
            refused = self.closed
            if not refused:
                self.running += 1
        if refused:
            refuse(
                context,
                method,
                grpc.StatusCode.UNAVAILABLE,
                f"this {self.what} is draining (shutting down) and takes no new requests: "
                "send the request to another group",
            )
        try:
            yield None
        finally:
            with self.lock:
                self.running -= 1


@dataclass
class Drain:
    """What a worker does on SIGTERM before its gRPC server stops (``service.wait_for_termination``).

    It also owns the worker's readiness (health name ``rpc.READY``, the Kubernetes readiness probe): a
    worker builds its Drain once it is warm (model loaded, ranks up, server started) and has started its
    registration; READY turns SERVING at the first heartbeat Redis accepts, and NOT_SERVING when the
    drain starts."""

    registration: Registration
    gate: DrainGate
    health: HealthServicer
    timeout_s: float

    def __post_init__(self) -> None:
        self.registration.when_registered(
            lambda: self.health.set(READY, health_pb2.HealthCheckResponse.SERVING)  # ignored once draining
        )

    def __call__(self) -> None:
        t0 = time.monotonic()
        self.registration.deregister()  # routers stop picking us at their next registry read
        self.gate.close()
        self.health.drain()
        log.info("draining: no new requests; waiting up to %.0f s for running ones", self.timeout_s)
        while self.gate.running or self.registration.load().active_requests:
            if time.monotonic() - t0 > self.timeout_s:
                log.warning(
                    "drain timed out after %.0f s with %d requests still running: stopping anyway",
                    self.timeout_s,
                    self.registration.load().active_requests,
                )
                return
            time.sleep(0.05)
        log.info("drained in %.1f s", time.monotonic() - t0)

    def give_up(self, what: str) -> None:
        """The worker's group broke (a rank died): leave the registry and fail liveness at once, so
        routers stop sending it requests now rather than after the registry TTL, then stop the
        process (SIGTERM to itself: the usual drain and shutdown), so that its supervisor (``ringserve
        up``, or Kubernetes) starts a fresh one."""
        log.error("%s; leaving the registry and exiting so that a fresh group is started", what)
        self.registration.deregister()
        self.health.enter_graceful_shutdown()
        os.kill(os.getpid(), signal.SIGTERM)
