"""The router: the client-facing gRPC service that runs a request through the tiers.

Generate: tokenize -> pick a prefill group and a decode worker -> Decode.Reserve (blocks and
where to write the KV) -> Prefill.Prefill (CP forward, KV pushed to the reserved blocks, first
token) -> Decode.Decode (streamed back to the client). The client's deadline bounds every
downstream call, and a client that goes away cancels the decode stream, which frees its blocks;
a request that fails before decoding starts releases its reservation.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc

from ringserve.config import RouterConfig
from ringserve.engine.engine import check_prompt
from ringserve.engine.tokenizer import Tokenizer
from ringserve.errors import DeadlineExceeded, InvalidArgument, Unavailable
from ringserve.metrics import QUEUE_DEPTH, TPOT, TTFT, serve_metrics
from ringserve.rpc import rpc_errors, sampling_from_proto, start_server, wait_ready
from ringserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

log = logging.getLogger(__name__)


class Backend:
    """A downstream service and how many of our requests it is working on."""

    def __init__(self, address: str, stub_cls):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = stub_cls(self.channel)
        self.inflight = 0


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, cfg: RouterConfig, tokenizer: Tokenizer, model: common_pb2.ModelDescription):
        if not cfg.prefill or not cfg.decode:
            raise InvalidArgument("the router needs at least one --prefill and one --decode address")
        self.tokenizer, self.model = tokenizer, model
        self.prefill = [Backend(a, prefill_pb2_grpc.PrefillStub) for a in cfg.prefill]
        self.decode = [Backend(a, decode_pb2_grpc.DecodeStub) for a in cfg.decode]
        self.lock = threading.Lock()

    def _pick(self, backends: list[Backend]) -> Backend:
        """Least in-flight requests first (the cache-aware policy comes with Redis residency)."""
        with self.lock:
            b = min(backends, key=lambda b: b.inflight)
            b.inflight += 1
            return b

    def _done(self, backend: Backend) -> None:
        with self.lock:
            backend.inflight -= 1

    def _prompt_ids(self, request) -> list[int]:
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

    @staticmethod
    def _timeout(context) -> float | None:
        remaining = context.time_remaining()
        if remaining is None or remaining > 1e7:  # no deadline set (gRPC reports a huge number)
            return None
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before it could start")
        return remaining

    @rpc_errors("router")
    def Generate(self, request, context):
        t_start = time.perf_counter()
        rid = request.request_id or uuid.uuid4().hex
        ids = self._prompt_ids(request)
        params = sampling_from_proto(request.sampling)  # validates
        params.validate_for(self.model.vocab_size)
        prefill, decode = self._pick(self.prefill), self._pick(self.decode)
        QUEUE_DEPTH.labels("router").inc()
        decoding = False
        try:
            reserve = decode.stub.Reserve(
                decode_pb2.ReserveRequest(request_id=rid, prompt_tokens=len(ids), max_tokens=params.max_tokens),
                timeout=self._timeout(context),
            )
            first = prefill.stub.Prefill(
                prefill_pb2.PrefillRequest(
                    request_id=rid, token_ids=ids, sampling=request.sampling, targets=reserve.targets
                ),
                timeout=self._timeout(context),
            )
            stream = decode.stub.Decode(
                decode_pb2.DecodeRequest(
                    request_id=rid,
                    prompt_token_ids=ids,
                    first_token=first.first_token,
                    sampling=request.sampling,
                ),
                timeout=self._timeout(context),
            )
            decoding = True
            context.add_callback(stream.cancel)  # client gone: cancel downstream, which frees the blocks
            log.info(
                "request_id=%s prompt_tokens=%d prefill=%s decode=%s strategy=%s",
                rid,
                len(ids),
                prefill.address,
                decode.address,
                first.strategy,
            )
            t_first = None
            for msg in stream:
                if t_first is None:
                    t_first = time.perf_counter()
                    TTFT.observe(t_first - t_start)
                usage = None
                if msg.finish_reason:
                    usage = common_pb2.Usage(
                        prompt_tokens=len(ids),
                        completion_tokens=msg.completion_tokens,
                        cached_prompt_tokens=first.cached_prompt_tokens,
                    )
                    if msg.completion_tokens > 1:
                        TPOT.observe((time.perf_counter() - t_first) / (msg.completion_tokens - 1))
                yield router_pb2.GenerateResponse(
                    request_id=rid,
                    text=msg.text,
                    token_ids=[msg.token_id],
                    finish_reason=msg.finish_reason,
                    usage=usage,
                )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(f"request {rid}: a worker became unavailable: {e.details()}") from e
            raise
        finally:
            QUEUE_DEPTH.labels("router").dec()
            self._done(prefill)
            self._done(decode)
            if not decoding:
                try:  # nothing will decode it: free the reservation now rather than at its TTL
                    decode.stub.Release(decode_pb2.ReleaseRequest(request_id=rid), timeout=5)
                except grpc.RpcError as e:
                    log.warning("request_id=%s could not release its reservation: %s", rid, e.details())

    @rpc_errors("router")
    def Tokenize(self, request, context):
        return router_pb2.TokenizeResponse(token_ids=self.tokenizer.encode(request.text, request.add_special_tokens))

    @rpc_errors("router")
    def GetModelInfo(self, request, context):
        return router_pb2.GetModelInfoResponse(
            model=self.model, prefill_groups=len(self.prefill), decode_groups=len(self.decode)
        )


def serve(cfg: RouterConfig):
    """Wait for the workers, then start the router; returns (server, port)."""
    for address in [*cfg.prefill, *cfg.decode]:
        wait_ready(address, cfg.ready_timeout_s)
    with grpc.insecure_channel(cfg.decode[0]) as channel:
        model = decode_pb2_grpc.DecodeStub(channel).GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=30).model
    servicer = RouterServicer(cfg, Tokenizer.from_checkpoint(cfg.model), model)
    server, port, _ = start_server(
        [(router_pb2_grpc.add_RouterServicer_to_server, servicer)],
        ["ringserve.v1.Router"],
        cfg.host,
        cfg.port,
    )
    serve_metrics(cfg.metrics_port)
    log.info("router serving on %s:%d (prefill %s, decode %s)", cfg.host, port, cfg.prefill, cfg.decode)
    return server, port
