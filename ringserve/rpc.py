"""What every gRPC service shares: server setup (health, reflection) and the one error mapping.

Servicer methods raise ``RingserveError`` for anything a caller should see; ``rpc_errors`` turns
it into the matching gRPC status with its message. A status from a downstream service passes
through unchanged. Anything else is a bug: logged with its traceback, reported as INTERNAL.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ringserve.engine.sampling import SamplingParams
from ringserve.errors import InvalidArgument, RingserveError, grpc_status
from ringserve.metrics import REQUESTS
from ringserve.v1 import common_pb2

log = logging.getLogger(__name__)

# Health service names for Kubernetes probes (gRPC health checking, besides "" and the API services):
LIVE = "ringserve.live"  # SERVING while the process answers and is not broken, draining included (liveness)
READY = "ringserve.ready"  # workers: SERVING once warm and registered in Redis, until they drain (readiness)


class HealthServicer(health.HealthServicer):
    """Standard gRPC health, plus ``LIVE``: SERVING while the server answers, also while it drains
    (``drain()``: every other name turns NOT_SERVING). ``enter_graceful_shutdown()`` outside a drain
    means the server gave up (e.g. its group broke): then ``LIVE`` is NOT_SERVING too, and Kubernetes
    restarts the process."""

    draining = False
    broken = False

    def drain(self) -> None:
        self.draining = True
        self.enter_graceful_shutdown()

    def enter_graceful_shutdown(self) -> None:
        self.broken = self.broken or not self.draining
        super().enter_graceful_shutdown()

    def Check(self, request, context):
        if request.service == LIVE:
            live = health_pb2.HealthCheckResponse.NOT_SERVING if self.broken else health_pb2.HealthCheckResponse.SERVING
            return health_pb2.HealthCheckResponse(status=live)
        return super().Check(request, context)


def _abort_for(context: grpc.ServicerContext, e: BaseException, service: str, method: str):
    if isinstance(e, RingserveError):
        code, message = grpc_status(e), str(e)
    elif isinstance(e, grpc.RpcError) and isinstance(e, grpc.Call):
        code, message = e.code(), f"{e.details()}"
    else:
        log.exception("%s.%s failed", service, method)
        code, message = (
            grpc.StatusCode.INTERNAL,
            f"internal error in {service}.{method}: {type(e).__name__}: {e}",
        )
    REQUESTS.labels(service, method, code.name).inc()
    context.abort(code, message)


def rpc_errors(service: str) -> Callable:
    """Decorator for servicer methods (unary or server-streaming): one error mapping for all."""

    def wrap(fn):
        method = fn.__name__
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(self, request, context):
                try:
                    yield from fn(self, request, context)
                except Exception as e:
                    _abort_for(context, e, service, method)
                REQUESTS.labels(service, method, "OK").inc()

            return stream

        @functools.wraps(fn)
        def unary(self, request, context):
            try:
                result = fn(self, request, context)
            except Exception as e:
                _abort_for(context, e, service, method)
            REQUESTS.labels(service, method, "OK").inc()
            return result

        return unary

    return wrap


def start_server(
    add_servicers: list[tuple[Callable, object]],
    service_names: list[str],
    host: str,
    port: int,
    max_workers: int = 64,
    interceptors: list[grpc.ServerInterceptor] | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started gRPC server with the given servicers, standard health checking and reflection.

    Returns the server, the bound port (``port`` 0 picks one) and the health servicer (SERVING; ``READY``
    is not set here: a worker's ``drain.Drain`` sets it once the worker is registered).
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors)
    for add, servicer in add_servicers:
        add(servicer, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RingserveError(f"could not listen on {host}:{port}: is the port in use?")
    server.start()
    return server, bound, health_servicer


def wait_ready(address: str, timeout_s: float) -> None:
    """Block until the server at ``address`` answers health checks as SERVING."""
    deadline = time.monotonic() + timeout_s
    while True:
        # A fresh channel per try: a long-lived one backs off for up to minutes after early failures.
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} did not become ready within {timeout_s:.0f} s")
        time.sleep(0.2)


def sampling_from_proto(msg) -> SamplingParams:
    """SamplingParams from the API message; unset fields take the engine's defaults."""
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else defaults.max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else defaults.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else defaults.top_p,
        top_k=msg.top_k if msg.HasField("top_k") else defaults.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
    )


def check_ttft_slo(seconds: float) -> float | None:
    """A request's time-to-first-token budget: None when unset (0), else positive seconds."""
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgument(
            f"ttft_slo_seconds must be a positive number of seconds, or 0 for the default; got {seconds}"
        )
    return seconds or None


def model_description(model, block_size: int, name: str) -> common_pb2.ModelDescription:
    c = model.config
    return common_pb2.ModelDescription(
        name=name,
        vocab_size=c.vocab_size,
        max_context=c.max_position_embeddings,
        num_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        block_size=block_size,
    )


FINISH_REASONS = {None: 0, "stop": 1, "length": 2}
