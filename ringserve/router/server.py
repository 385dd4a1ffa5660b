"""The router: the client-facing gRPC service that runs a request through the tiers.

Generate: tokenize -> pick a prefill group and a decode group (``router.balancer``: groups from
the registry in Redis, scored by the policy) -> Decode.Reserve (blocks and where to write the KV)
-> Prefill.Prefill (CP forward, KV pushed to the reserved blocks, first token) -> Decode.Decode
(streamed back to the client). ``RequestRun`` owns one request through these stages.
"""

from __future__ import annotations

import functools
import logging

import grpc
from google.protobuf.message import DecodeError

from ringserve import rpc
from ringserve.config import RouterConfig
from ringserve.engine.engine import check_prompt
from ringserve.engine.tokenizer import Tokenizer
from ringserve.errors import InvalidArgument, Unavailable
from ringserve.metrics import REQUESTS, serve_metrics
from ringserve.router.balancer import Balancer
from ringserve.router.request import RequestRun
from ringserve.rpc import rpc_errors, start_server
from ringserve.tls import check_bind
from ringserve.v1 import common_pb2, decode_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(
        self, balancer: Balancer, tokenizer: Tokenizer, model: common_pb2.ModelDescription, migration_limit: int = 1
    ):
        self.balancer, self.tokenizer, self.model = balancer, tokenizer, model
        self.migration_limit = migration_limit  # decode groups a stream may move to when its own dies

    def prompt_ids(self, request: router_pb2.GenerateRequest) -> list[int]:
        """The request's prompt as token ids, validated against the model."""
        kind = request.WhichOneof("input")
        if kind == "prompt":
            ids = self.tokenizer.encode(request.prompt)
        elif kind == "messages":
            msgs = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            if not msgs:
                raise InvalidArgument("messages is empty: give at least one chat message")
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            raise InvalidArgument("set one of prompt, messages or token_ids")
        return check_prompt(ids, self.model.max_context, self.model.vocab_size)

    @rpc_errors("router")
    def Generate(self, request, context):
        yield from RequestRun(self, request, context).run()

    @rpc_errors("router")
    def Tokenize(self, request, context):
        return router_pb2.TokenizeResponse(token_ids=self.tokenizer.encode(request.text, request.add_special_tokens))

    @rpc_errors("router")
    def GetModelInfo(self, request, context):
        return router_pb2.GetModelInfoResponse(
            model=self.model,
            prefill_groups=len(self.balancer.known("prefill")),
            decode_groups=len(self.balancer.known("decode")),
        )


def _parsed(handler, request_type, method: str, streaming: bool):
    """``handler`` called with the request parsed from its bytes; bytes that do not parse get
    INVALID_ARGUMENT with a message (gRPC's own deserializer would answer INTERNAL)."""

    def parse(data: bytes, context):
        try:
            return request_type.FromString(data)
        except DecodeError:
            REQUESTS.labels("router", method, "INVALID_ARGUMENT").inc()
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the {request_type.DESCRIPTOR.name} could not be parsed: a text field (prompt, chat message, "
                "stop string) that is not valid UTF-8, or bytes that are not this message; send text as UTF-8, "
                "or token ids",
            )

    if streaming:

        @functools.wraps(handler)
        def stream(data, context):
            yield from handler(parse(data, context), context)

        return stream

    @functools.wraps(handler)
    def unary(data, context):
        return handler(parse(data, context), context)

    return unary


def add_router_servicer(servicer: RouterServicer, server: grpc.Server) -> None:
    """Register the Router service as ``router_pb2_grpc.add_RouterServicer_to_server`` does, but
    with requests parsed inside the handler (``_parsed``)."""
    handlers = {}
    for method in router_pb2.DESCRIPTOR.services_by_name["Router"].methods:
        request_type = getattr(router_pb2, method.input_type.name)
        response_type = getattr(router_pb2, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handler = _parsed(getattr(servicer, method.name), request_type, method.name, method.server_streaming)
        handlers[method.name] = make(handler, response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("ringserve.v1.Router", handlers),))
    server.add_registered_method_handlers("ringserve.v1.Router", handlers)


def _model_description(balancer: Balancer) -> common_pb2.ModelDescription:
    """The model the workers serve, from the first decode group that answers."""
    errors = []
    for group in balancer.known("decode"):
        try:
            return group.stub.GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=30).model
        except grpc.RpcError as e:
            errors.append(f"{group.address}: {e.details()}")
    raise Unavailable(f"no registered decode group answered GetInfo: {'; '.join(errors)}")


def serve(cfg: RouterConfig):
    """Wait for a prefill and a decode group to register, then start the router; returns (server, port, balancer)."""
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise InvalidArgument("--tls-client-ca needs TLS on the client port: give --tls-cert, --tls-key and --tls-ca")
    rpc.configure_channels(cfg)  # the router's channels to the groups present its certificate (mTLS)
    balancer = Balancer(cfg).start()
    try:
        balancer.wait_for_groups(cfg.ready_timeout_s)
        if cfg.migration_limit < 0:
            raise InvalidArgument(f"--migration-limit must be >= 0 (0: off), got {cfg.migration_limit}")
        tokenizer = Tokenizer.from_checkpoint(cfg.model)
        servicer = RouterServicer(balancer, tokenizer, _model_description(balancer), cfg.migration_limit)
        if cfg.http_port is not None:  # the OpenAI-compatible door: its port now, its start once Generate serves
            from ringserve.router.http import HttpServer

            tls = (cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
            if tls is None:
                check_bind(cfg.host, cfg, "the HTTP API")  # plaintext off loopback only with --insecure
            http = HttpServer(cfg.host, cfg.http_port, servicer.model, tls)
        server, port, _ = start_server(
            [(add_router_servicer, servicer)],
            ["ringserve.v1.Router"],
            cfg.host,
            cfg.port,
            limits=cfg,
            internal=False,
        )
        if cfg.http_port is not None:
            http.start(port)
            log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if tls else "http", cfg.host, http.port)
    except BaseException:
        balancer.close()
        raise
    serve_metrics(cfg.metrics_port)
    log.info(
        "router serving on %s:%d (policy %s; groups from Redis at %s, cluster %s: %d prefill, %d decode)",
        cfg.host,
        port,
        cfg.policy,
        balancer.redis_url,
        cfg.cluster,
        len(balancer.known("prefill")),
        len(balancer.known("decode")),
    )
    return server, port, balancer
