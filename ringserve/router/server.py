"""The router: the client-facing gRPC service that runs a request through the tiers.

Generate: tokenize -> pick a prefill group and a decode group (``router.balancer``: groups from
the registry in Redis, scored by the policy) -> Decode.Reserve (blocks and where to write the KV)
-> Prefill.Prefill (CP forward, KV pushed to the reserved blocks, first token) -> Decode.Decode
(streamed back to the client). A group that answers UNAVAILABLE to Reserve or Prefill (dead, or
draining) is replaced by another of its role, twice at most. The client's deadline bounds every
downstream call, and a client that goes away cancels the decode stream, which frees its blocks;
a request that fails before decoding starts releases its reservation.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import grpc

from ringserve import rpc
from ringserve.config import RouterConfig
from ringserve.engine.engine import check_prompt
from ringserve.engine.tokenizer import Tokenizer
from ringserve.errors import DeadlineExceeded, InvalidArgument, Unavailable
from ringserve.metrics import QUEUE_DEPTH, TPOT, TTFT, serve_metrics
from ringserve.router.balancer import Balancer, Decision
from ringserve.rpc import check_ttft_slo, rpc_errors, sampling_from_proto, start_server
from ringserve.v1 import (
    common_pb2,
    decode_pb2,
    prefill_pb2,
    router_pb2,
    router_pb2_grpc,
)

log = logging.getLogger(__name__)

_ATTEMPTS = 3  # per role: the picked group and two others


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, balancer: Balancer, tokenizer: Tokenizer, model: common_pb2.ModelDescription):
        self.balancer, self.tokenizer, self.model = balancer, tokenizer, model

    def _with_failover(self, rid: str, decision: Decision, role: str, call: Callable):
        """``call(group)`` on the decision's ``role`` group; on UNAVAILABLE move to another group."""
        for attempt in range(_ATTEMPTS):
            group = getattr(decision, role)
            try:
                return call(group)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == _ATTEMPTS - 1:
                    raise
                if not self.balancer.repick(decision, role):
                    raise
                log.warning(
                    "request_id=%s %s group %s unavailable (%s): retrying on %s",
                    rid,
                    role,
                    group.address,
                    e.details(),
                    getattr(decision, role).address,
                )

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
        check_ttft_slo(request.ttft_slo_seconds)
        decision = self.balancer.pick(ids, params.max_tokens)
        QUEUE_DEPTH.labels("router").inc()
        prefilling, decoding = True, False  # the pick counted the prompt as pending at its prefill group
        try:
            reserve = self._with_failover(
                rid,
                decision,
                "decode",
                lambda g: g.stub.Reserve(
                    decode_pb2.ReserveRequest(request_id=rid, prompt_tokens=len(ids), max_tokens=params.max_tokens),
                    timeout=self._timeout(context),
                ),
            )
            first = self._with_failover(
                rid,
                decision,
                "prefill",
                lambda g: g.stub.Prefill(
                    prefill_pb2.PrefillRequest(
                        request_id=rid,
                        token_ids=ids,
                        sampling=request.sampling,
                        targets=reserve.targets,
                        # What is left of the budget once the prefill group has the request.
                        ttft_slo_seconds=max(1e-3, request.ttft_slo_seconds - (time.perf_counter() - t_start))
                        if request.ttft_slo_seconds
                        else 0.0,
                    ),
                    timeout=self._timeout(context),
                ),
            )
            self.balancer.release(decision, "prefill")
            prefilling = False
            stream = decision.decode.stub.Decode(
                decode_pb2.DecodeRequest(
                    request_id=rid,
                    prompt_tokens=len(ids),
                    first_token=first.first_token,
                    sampling=request.sampling,
                ),
                timeout=self._timeout(context),
            )
            decoding = True
            context.add_callback(stream.cancel)  # client gone: cancel downstream, which frees the blocks
            log.info(
                "request_id=%s prompt_tokens=%d prefill=%s decode=%s policy=%s expected_cached_tokens=%d strategy=%s",
                rid,
                len(ids),
                decision.prefill.address,
                decision.decode.address,
                decision.policy,
                decision.cached_tokens,
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
            if prefilling:
                self.balancer.release(decision, "prefill")
            self.balancer.release(decision, "decode")
            if not decoding:
                try:  # nothing will decode it: free the reservation now rather than at its TTL
                    decision.decode.stub.Release(decode_pb2.ReleaseRequest(request_id=rid), timeout=5)
                except grpc.RpcError as e:
                    log.warning("request_id=%s could not release its reservation: %s", rid, e.details())

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
        servicer = RouterServicer(balancer, Tokenizer.from_checkpoint(cfg.model), _model_description(balancer))
        server, port, _ = start_server(
            [(router_pb2_grpc.add_RouterServicer_to_server, servicer)],
            ["ringserve.v1.Router"],
            cfg.host,
            cfg.port,
            limits=cfg,
            internal=False,
        )
    except BaseException:
        balancer.close()
        raise
    serve_metrics(cfg.metrics_port)
    log.info(
        "router serving on %s:%d (policy %s; groups from Redis at %s, cluster %s: %d prefill, %d decode)",
        cfg.host,
        port,
        cfg.policy,
        cfg.redis_url,
        cfg.cluster,
        len(balancer.known("prefill")),
        len(balancer.known("decode")),
    )
    return server, port, balancer
