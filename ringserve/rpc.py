"""What every gRPC service shares: server setup (health, reflection, limits), channels, and the one
error mapping.

Servicer methods raise ``RingserveError`` for anything a caller should see; ``rpc_errors`` turns
it into the matching gRPC status with its message. A status from a downstream service passes
through unchanged. Anything else is a bug: logged with its traceback, reported as INTERNAL.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from contextlib import AbstractContextManager
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from ringserve.auth import ApiKeyAuth
from ringserve.config import MAX_MESSAGE_MB, GrpcArgs
from ringserve.engine.sampling import SamplingParams
from ringserve.errors import FailedPrecondition, InvalidArgument, RingserveError, grpc_status
from ringserve.metrics import REQUESTS
from ringserve.tls import (
    ChannelTls,
    FollowingAioChannel,
    FollowingChannel,
    RoleCheck,
    channel_tls,
    check_bind,
    check_tls_args,
    server_credentials,
)
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

    def List(self, request, context):
        """Every health name this server knows, with its status (``LIVE`` included)."""
        with self._lock:
            statuses = {name: health_pb2.HealthCheckResponse(status=s) for name, s in self._server_status.items()}
        statuses[LIVE] = self.Check(health_pb2.HealthCheckRequest(service=LIVE), context)
        return health_pb2.HealthListResponse(statuses=statuses)


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


# Threads kept free of long calls, so health checks and control calls (Reserve, Release, GetInfo,
# refusals of over-limit calls) always find one at once.
CONTROL_THREADS = 16
# Unary calls that last as long as the work they start (a whole prefill); streams count too.
LONG_UNARY_CALLS = frozenset({"/ringserve.v1.Prefill/Prefill"})
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def message_options(max_message_mb: int) -> list[tuple[str, int]]:
    """gRPC options that set the largest message sent and received, in both directions."""
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def _channel_options(max_message_mb: int | None) -> list[tuple[str, int]]:
    return message_options(max_message_mb or int(os.environ.get("RINGSERVE_MAX_MESSAGE_MB", MAX_MESSAGE_MB)))


_process_tls: ChannelTls | None = None


def configure_channels(cfg: GrpcArgs) -> None:
    """Make every channel this process opens by default present ``cfg``'s certificate and verify
    peers against its CA (plaintext when ``cfg`` has no TLS). Services call it once at start."""
    global _process_tls
    _process_tls = channel_tls(cfg)


def channel(address: str, max_message_mb: int | None = None, tls: ChannelTls | None = None) -> grpc.Channel:
    """A channel to ``address`` with ringserve's message limits (``max_message_mb``, else
    RINGSERVE_MAX_MESSAGE_MB, else ``config.MAX_MESSAGE_MB``): gRPC's 4 MiB default would refuse
    million-token prompts and their token ids. TLS (``tls``, else this process's from
    ``configure_channels``) verifies the peer's certificate against the CA and ``address``'s host, and
    follows rotated certificate files (``tls.FollowingChannel``): new calls connect with them."""
    tls = tls or _process_tls
    options = _channel_options(max_message_mb)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return FollowingChannel(address, tls, options)


def aio_channel(address: str, max_message_mb: int | None = None, tls: ChannelTls | None = None) -> grpc.aio.Channel:
    """``channel`` for asyncio clients."""
    tls = tls or _process_tls
    options = _channel_options(max_message_mb)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return FollowingAioChannel(address, tls, options)


class CallCheck(Protocol):
    """A decision about calls that ``Checked`` applies around a server's handlers: the role check
    (``tls.RoleCheck``), API keys (``auth.ApiKeyAuth``), ``CallLimit`` and a worker's ``drain.DrainGate``."""

    def guards(self, method: str, streaming: bool) -> bool:
        """Whether calls of ``method`` (its full name; ``streaming``: it answers with a stream) are checked."""

    def admit(self, method: str, context: grpc.ServicerContext) -> AbstractContextManager[Callable | None]:
        """Entered before the servicer runs (abort ``context`` there to refuse the call), left when the
        call ends, however it ends; what it gives, if not None, sees each response of a stream."""


# Handler kinds by whether their responses stream (requests may stream in both).
_HANDLER_KINDS = (("unary_unary", False), ("stream_unary", False), ("unary_stream", True), ("stream_stream", True))


def refuse(context: grpc.ServicerContext, method: str, code: grpc.StatusCode, message: str) -> None:
    """End a call that a check refused with ``code``, counted in ``ringserve_requests_total`` as servicers' are."""
    service, name = method.rsplit("/", 1)
    REQUESTS.labels(service.rsplit(".", 1)[-1].lower(), name, code.name).inc()
    context.abort(code, message)


class Checked(grpc.ServerInterceptor):
    """The one place where ringserve wraps gRPC handlers: ``check`` around every call it guards."""

    def __init__(self, check: CallCheck):
        self.check = check

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        kind, streaming = next((k, s) for k, s in _HANDLER_KINDS if getattr(handler, k) is not None)
        if not self.check.guards(method, streaming):
            return handler
        behavior, admit = getattr(handler, kind), self.check.admit
        if streaming:

            def call(request, context):
                with admit(method, context) as seen:
                    for response in behavior(request, context):
                        if seen is not None:
                            seen(response)
                        yield response

        else:

            def call(request, context):
                with admit(method, context):
                    return behavior(request, context)

        return handler._replace(**{kind: call})


class CallLimit:
    """Counts the calls that hold a server thread for a request's life (ringserve's streams and
    ``LONG_UNARY_CALLS``) and refuses those beyond ``limit`` at once with RESOURCE_EXHAUSTED, so the
    thread pool (sized ``limit + CONTROL_THREADS``) always has threads for health and control calls."""

    def __init__(self, limit: int):
        self.limit = limit
        self.lock = threading.Lock()
        self.running = 0

    def guards(self, method: str, streaming: bool) -> bool:
        return method.startswith("/ringserve.") and (streaming or method in LONG_UNARY_CALLS)

    @contextlib.contextmanager
    def admit(self, method: str, context: grpc.ServicerContext):
        with self.lock:
            admitted = self.running < self.limit
            self.running += admitted
        if not admitted:
            refuse(
                context,
                method,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server is running its limit of {self.limit} concurrent requests "
                "(--max-concurrent-requests): retry later or elsewhere",
            )
        try:
            yield None
        finally:
            with self.lock:
                self.running -= 1


def _add_reflection(server: grpc.Server, service_names: list[str]) -> None:
    """Server reflection under both names clients ask for: v1 and v1alpha. grpcio-reflection ships
    only v1alpha; the two protocols' messages are the same on the wire, so v1 is served by the same
    servicer through a handler of its own name."""
    names = [*service_names, reflection.SERVICE_NAME, REFLECTION_V1, health.SERVICE_NAME]
    servicer = reflection.ReflectionServicer(names)
    for service in (reflection.SERVICE_NAME, REFLECTION_V1):
        handlers = {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def start_server(
    add_servicers: list[tuple[Callable, object]],
    service_names: list[str],
    host: str,
    port: int,
    interceptors: list[CallCheck] | None = None,
    limits: GrpcArgs | None = None,
    internal: bool = True,
) -> tuple[grpc.Server, int, HealthServicer]:
    """A started gRPC server with the given servicers, standard health checking and reflection.

    ``limits`` (a service's config) bounds the concurrent long calls (``CallLimit``) and the message
    size, and sets TLS (``tls.py``): an ``internal`` server requires client certificates of the
    deployment CA and serves its API to the router role only; the router's client port
    (``internal=False``) requires client certificates only under ``--tls-client-ca``, and API keys
    under ``--api-keys-file`` (``auth.py``); ``interceptors`` are more checks (``CallCheck``: a worker's
    ``drain.DrainGate``), applied after these. Without TLS
    a non-loopback ``host`` needs ``--insecure``. The port must be free: gRPC's default SO_REUSEPORT
    would let a second server share it and take some of the first one's connections.
    Returns the server, the bound port (``port`` 0 picks one) and the health servicer (SERVING; ``READY``
    is not set here: a worker's ``drain.Drain`` sets it once the worker is registered).
    """
    limits = limits or GrpcArgs()
    if limits.max_concurrent_requests < 1:
        raise InvalidArgument(f"--max-concurrent-requests must be >= 1, got {limits.max_concurrent_requests}")
    if not 1 <= limits.max_message_mb <= 2047:  # gRPC takes a 32-bit signed byte count
        raise InvalidArgument(f"--max-message-mb must be 1 to 2047, got {limits.max_message_mb}")
    service = service_names[0].rsplit(".", 1)[-1] if service_names else "server"
    check_bind(host, limits, service)
    secure = check_tls_args(limits)
    if secure and internal:
        checks = [RoleCheck(limits.cluster, ("router",), service)]
    else:
        keys_file = getattr(limits, "api_keys_file", None)
        checks = [ApiKeyAuth(keys_file)] if keys_file else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.max_concurrent_requests + CONTROL_THREADS),
        interceptors=[Checked(c) for c in (*checks, CallLimit(limits.max_concurrent_requests), *(interceptors or []))],
        options=[("grpc.so_reuseport", 0), *message_options(limits.max_message_mb)],
    )
    for add, servicer in add_servicers:
        add(servicer, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _add_reflection(server, service_names)
    try:
        if secure:
            client_ca = limits.tls_ca if internal else getattr(limits, "tls_client_ca", None)
            creds = server_credentials(limits.tls_cert, limits.tls_key, client_ca)
            bound = server.add_secure_port(f"{host}:{port}", creds)
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise FailedPrecondition(f"could not listen on {host}:{port}: the port is in use, or not an address here")
    server.start()
    return server, bound, health_servicer


def wait_ready(address: str, timeout_s: float, tls: ChannelTls | None = None) -> None:
    """Block until the server at ``address`` answers health checks as SERVING (over ``tls`` if given)."""
    deadline = time.monotonic() + timeout_s
    while True:
        # A fresh channel per try: a long-lived one backs off for up to minutes after early failures.
        with channel(address, tls=tls) as ch:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
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
    c = model.tp.full_config if model.tp is not None else model.config  # a TP shard describes the whole model
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
