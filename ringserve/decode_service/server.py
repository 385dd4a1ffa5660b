"""The decode service: gRPC front of a KVP decode group's leader (DecodeWorker + DecodeGroup)."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator

from ringserve.config import DecodeConfig
from ringserve.decode_service.group import DecodeGroup
from ringserve.decode_service.reservations import DecodeRequest
from ringserve.decode_service.worker import DecodeWorker
from ringserve.engine.engine import TokenEvent
from ringserve.errors import RingserveError, Unavailable
from ringserve.registry_schema import Load
from ringserve.rpc import FINISH_REASONS, model_description, rpc_errors, sampling_from_proto
from ringserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)

EVENT_POLL_S = 1.0  # how often a waiting stream checks that the worker still runs


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker, model_desc: common_pb2.ModelDescription):
        self.worker = worker
        self.model_desc = model_desc

    @rpc_errors("decode")
    def Reserve(self, request, context):
        res = self.worker.reserve(request.request_id, request.prompt_tokens, request.max_tokens, request.prefill_group)
        return decode_pb2.ReserveResponse(
            targets=[
                common_pb2.KVTarget(
                    rank=r,
                    address=a,
                    first_position=f,
                    num_tokens=n,
                    nixl_landing=landing,
                    epoch=res.epoch,
                    first_kv_head=head,
                    kv_heads=heads,
                )
                for r, a, f, n, landing, head, heads in res.targets
            ],
            epoch=res.epoch,
            lease_seconds=res.lease_s,
        )

    @rpc_errors("decode")
    def Decode(self, request, context):
        rid = request.request_id
        try:
            params = sampling_from_proto(request.sampling)
        except RingserveError as e:
            self.worker.fail_reserved(rid, e)  # the router handed the reservation to us: free it now
            raise
        # start() ends the reservation itself if the request cannot start.
        req = self.worker.start(rid, request.prompt_tokens, request.first_token, params)
        context.add_callback(lambda: self.worker.cancel(rid))  # the caller went away
        log.info("request_id=%s decoding prompt_tokens=%d", rid, req.prompt_len)
        try:
            yield from self.responses(req)
        finally:
            self.worker.cancel(rid)  # no-op once finished

    def responses(self, req: DecodeRequest) -> Iterator[decode_pb2.DecodeResponse]:
        """A started request's stream. Each message carries the next event (waited for) and every
        event already queued behind it: a stream that falls behind the decode steps catches up in
        one message instead of one per token (per-message gRPC cost caps throughput under load),
        and no token waits for others. An error ends the stream after the tokens queued before it."""
        sent = 0
        while True:
            events, error = [self._next_event(req)], None
            while not events[-1].finish_reason:
                try:
                    item = req.events.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, RingserveError):
                    error = item
                    break
                events.append(item)
            sent += len(events)
            reason = events[-1].finish_reason
            yield decode_pb2.DecodeResponse(
                token_ids=[e.token_id for e in events],
                text="".join(e.text for e in events),
                finish_reason=FINISH_REASONS[reason],
                completion_tokens=sent,
            )
            if error is not None:
                raise error
            if reason:
                log.info("request_id=%s finished reason=%s tokens=%d", req.request_id, reason, sent)
                return

    def _next_event(self, req: DecodeRequest) -> TokenEvent:
        """The stream's next event; raises the request's error, or UNAVAILABLE once the worker
        can no longer produce events (its loop or output thread died): never waits forever."""
        while True:
            try:
                event = req.events.get(timeout=EVENT_POLL_S)
            except queue.Empty:
                if not self.worker.serving:
                    raise Unavailable(
                        f"decode group failed: {self.worker.failure or 'its decode loop stopped'}"
                    ) from None
                continue
            if isinstance(event, RingserveError):
                raise event
            return event

    @rpc_errors("decode")
    def Release(self, request, context):
        return decode_pb2.ReleaseResponse(
            released=self.worker.cancel(request.request_id, landing_unused=request.landing_unused)
        )

    @rpc_errors("decode")
    def Renew(self, request, context):
        return decode_pb2.RenewResponse(renewed=self.worker.renew(request.request_id, request.epoch))

    @rpc_errors("decode")
    def GetInfo(self, request, context):
        w = self.worker
        with w.lock:
            return decode_pb2.GetDecodeInfoResponse(
                model=self.model_desc,
                kvp_size=w.group.world,
                tp_size=w.group.tp,
                active_requests=len(w.active),
                reserved_requests=len(w.requests) - len(w.active),
                kv_blocks_used=w.blocks_used,
                kv_blocks_free=w.admissible_blocks(),
                transport=w.group.transport,
            )


def serve(cfg: DecodeConfig):
    """Start the decode group (ranks 1..K-1 as child processes), its worker and the gRPC server,
    register in Redis; returns (server, port, worker, drain)."""
    from ringserve.engine.tokenizer import Tokenizer
    from ringserve.service import WorkerService, check_device, serve_worker

    check_device(cfg.device)
    group = DecodeGroup(cfg)
    worker = DecodeWorker(
        group, Tokenizer.from_checkpoint(cfg.model), cfg.reservation_ttl_s, cfg.max_batch, cfg.shard_tokens
    )
    name = cfg.model or "SmolLM2-135M-Instruct"
    servicer = DecodeServicer(worker, model_description(group.model, cfg.block_size, name))

    def load() -> Load:
        with worker.lock:  # a reserved request counts: its Decode call is still to come
            return Load(
                active_requests=len(worker.requests),
                free_blocks=worker.admissible_blocks(),  # what one new request can get, not a sum
                total_blocks=worker.blocks_total,
            )

    service = WorkerService(
        "decode",
        cfg.kvp,
        decode_pb2_grpc.add_DecodeServicer_to_server,
        servicer,
        "ringserve.v1.Decode",
        "Reserve",
        load,
    )
    server, port, address, drain = serve_worker(cfg, service)
    worker.on_failure = lambda: drain.give_up(f"decode group failed: {worker.failure}")
    log.info(
        "decode group (tp=%d, kvp=%d) serving on %s, KV receivers at %s",
        cfg.tp,
        cfg.kvp,
        address,
        ", ".join(group.addresses),
    )
    return server, port, worker, drain
