"""The prefill service: gRPC front of a PrefillGroup (the group's leader process)."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from ringserve.config import PrefillConfig
from ringserve.engine.engine import check_prompt
from ringserve.engine.sampling import SamplingParams, sample
from ringserve.errors import Cancelled, InvalidArgument, PermissionDenied, RingserveError
from ringserve.heartbeat import WorkCounter
from ringserve.kv_transfer.landing import Landing
from ringserve.kv_transfer.secret import ReplayGuard, deployment_secret
from ringserve.metrics import KV_BLOCKS, KV_BYTES, QUEUE_DEPTH
from ringserve.prefill_service.group import Prefilled, PrefillGroup
from ringserve.prefill_service.protocol import Job
from ringserve.prefill_service.push import Target, check_targets
from ringserve.prefill_service.strategy import STRATEGIES
from ringserve.registry_schema import Load
from ringserve.rpc import check_ttft_slo, model_description, rpc_errors, sampling_from_proto
from ringserve.v1 import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, group: PrefillGroup, cfg: PrefillConfig):
        self.group, self.cfg = group, cfg
        self.model_desc = model_description(group.model, cfg.block_size, cfg.model or "SmolLM2-135M-Instruct")
        self.work = WorkCounter()  # admitted requests and tokens, measured speed: the registry's load
        self.landing_key = deployment_secret(cfg.deployment_secret_file)
        self.landings = ReplayGuard()
        self.group_id = ""  # this group's registry id, once registered: the landings it admits name it

    def _admit_landings(self, request) -> None:
        """Before anything is scheduled (so before any WRITE): each NIXL landing must pass its MAC,
        belong to this request and this prefill group, be unexpired and not used by an earlier Prefill
        here. (Another group refuses it for not naming it; so does this group after a restart, whose new
        registry id the landings of its previous run do not name: the guard need not outlive the process.)"""
        if self.group.transport != "nixl":
            return  # the ranks push over TCP: no landing directs a WRITE
        for t in request.targets:
            if not t.nixl_landing:
                continue
            landing = Landing.from_bytes(t.nixl_landing, self.landing_key)
            if landing.request_id != request.request_id:
                raise PermissionDenied(
                    f"request {request.request_id}: a target's KV landing belongs to request {landing.request_id}"
                )
            if not self.group_id or landing.prefill_group != self.group_id:
                raise PermissionDenied(
                    f"request {request.request_id}: the KV landing was issued for prefill group "
                    f"{landing.prefill_group or '(none named)'}, not this one ({self.group_id or 'unregistered'}): "
                    "a landing directs the WRITEs of the prefill group it was reserved for only"
                )
            self.landings.admit(landing.agent, landing.incarnation, landing.epoch, landing.expires, landing.request_id)

    def _job(self, request, targets: list[Target]) -> tuple[Job, SamplingParams]:
        """The request as the group takes it, validated; raises what the caller must fix."""
        config = self.group.model.config
        ids = check_prompt(request.token_ids, config.max_position_embeddings, config.vocab_size)
        if request.strategy not in ("", *STRATEGIES):
            raise InvalidArgument(f"strategy must be one of {STRATEGIES}, got {request.strategy!r}")
        full = self.group.model.tp.full_config if self.group.model.tp else config  # targets name global heads
        check_targets(targets, len(ids), full.num_key_value_heads)
        params = sampling_from_proto(request.sampling)
        params.validate_for(config.vocab_size)
        ttft_s = check_ttft_slo(request.ttft_slo_seconds)
        return Job(request.request_id, ids, request.strategy or self.cfg.strategy, targets, ttft_s), params

    @rpc_errors("prefill")
    def Prefill(self, request, context):
        targets = [Target.from_proto(t) for t in request.targets]
        self._admit_landings(request)  # an untrusted landing gets no done notice either
        try:
            job, params = self._job(request, targets)
            future = self.group.submit(job)
        except RingserveError:  # refused before it was queued: it will never WRITE to its landings
            self.group.pusher.notify_done(request.request_id, tuple(targets))
            raise
        ids = job.token_ids
        # Queue what this group must compute: a prompt it mostly holds is cheap here, and the
        # router must see that (counting cached tokens as work steered hits away from their cache).
        uncached = len(ids) - self.group.cached_prefix_tokens(ids)
        try:
            with self.work.admitted(uncached):
                QUEUE_DEPTH.labels("prefill").set(self.work.requests)
                done = self._wait(future, job.request_id, context)
        finally:
            QUEUE_DEPTH.labels("prefill").set(self.work.requests)
            self._update_gauges()
        self.work.observe(len(ids) - done.cached_tokens, done.compute_s)  # the speed of computing tokens
        first = sample(done.logits, params, params.generator(0))
        sent = sum(r.bytes_sent for r in done.results)
        transfer = max(r.transfer_s for r in done.results)
        KV_BYTES.labels("prefill", "sent").inc(sent)
        log.info(
            "request_id=%s prefilled tokens=%d cached_tokens=%d strategy=%s passes=%d queued=%.3fs "
            "compute=%.3fs kv_bytes=%d",
            job.request_id,
            len(ids),
            done.cached_tokens,
            done.strategy,
            done.passes,
            done.queued_s,
            done.compute_s,
            sent,
        )
        return prefill_pb2.PrefillResponse(
            first_token=first,
            strategy=done.strategy,
            compute_seconds=done.compute_s,
            transfer_seconds=transfer,
            bytes_transferred=sent,
            cached_prompt_tokens=done.cached_tokens,
            queued_seconds=done.queued_s,
            passes=done.passes,
        )

    def _wait(self, future: Future, request_id: str, context) -> Prefilled:
        """The request's result; if its client goes away (cancelled, deadline passed) first, the
        group drops the request, freeing what it holds."""
        while True:
            try:
                return future.result(timeout=0.05)
            except FutureTimeout:
                if not context.is_active():
                    self.group.cancel(request_id)
                    raise Cancelled(f"request {request_id}: the client cancelled or its deadline passed") from None

    def _update_gauges(self) -> None:
        alloc = self.group.runner.cache.allocator
        KV_BLOCKS.labels("prefill", "used").set(alloc.num_used)
        KV_BLOCKS.labels("prefill", "free").set(alloc.num_free)
        KV_BLOCKS.labels("prefill", "cached").set(self.group.cache_stats().blocks[0])

    def load(self) -> Load:
        """This group's load for the registry."""
        alloc = self.group.runner.cache.allocator
        return Load(
            queued_tokens=self.work.tokens,
            active_requests=self.work.requests,
            free_blocks=alloc.num_free,
            total_blocks=alloc.num_blocks,
            tokens_per_s=self.work.tokens_per_s,
        )

    @rpc_errors("prefill")
    def GetInfo(self, request, context):
        alloc = self.group.runner.cache.allocator
        stats = self.group.cache_stats()
        return prefill_pb2.GetPrefillInfoResponse(
            model=self.model_desc,
            cp_size=self.cfg.cp,
            tp_size=self.cfg.tp,
            transport=self.group.transport,
            active_requests=self.work.requests,
            kv_blocks_used=alloc.num_used,
            kv_blocks_free=alloc.num_free,
            prefix_cache=prefill_pb2.PrefixCacheInfo(
                blocks=stats.blocks,
                capacity_blocks=stats.capacity,
                lookups=stats.lookups,
                hits=stats.hits,
                cached_prompt_tokens=stats.hit_tokens,
            ),
        )


def serve(cfg: PrefillConfig):
    """Start the group and the gRPC server, register in Redis; returns (server, port, group, drain)."""
    from ringserve.service import WorkerService, serve_worker

    group = PrefillGroup(cfg)
    servicer = PrefillServicer(group, cfg)
    service = WorkerService(
        "prefill",
        cfg.cp,
        prefill_pb2_grpc.add_PrefillServicer_to_server,
        servicer,
        "ringserve.v1.Prefill",
        "Prefill",
        servicer.load,
        group.cache_changes,
    )
    server, port, address, drain = serve_worker(cfg, service)
    servicer.group_id = drain.registration.id
    group.on_broken = drain.give_up
    log.info("prefill group (tp=%d, cp=%d) serving on %s", cfg.tp, cfg.cp, address)
    return server, port, group, drain
