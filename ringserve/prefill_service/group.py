"""A prefill group's leader: N processes (T x N under TP, ``mesh.Layout``), one per device, run CP
prefill together; rank 0 leads.

The leader (the process serving gRPC) runs the scheduler. Requests are prefilled in passes (Medha,
Agrawal et al.): each pass is a chunk of one long prompt, or chunks of several prompts packed
together, picked least-remaining-slack first (``scheduler.Scheduler``). A long prompt's later
chunks attend to the KV its earlier chunks left in the ranks' caches (partial prefill), so a short
request waits at most about one pass, never for a whole long prompt. A request is preempted only
between chunks, and keeps its KV.

Every pass goes to every rank (``pass_runner.PassRunner``); after a request's last chunk each rank
hands its KV shard to its push stage (``push.Pusher``), and the leader answers the request when
every rank's push is over. A push failure fails only its request (ABORTED). Every decision about
blocks (``prefix_cache.PrefixIndex``) is the leader's and travels in the pass.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ringserve.config import PrefillConfig
from ringserve.engine.kv_cache import block_hashes
from ringserve.engine.model import Llama
from ringserve.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    RingserveError,
    Unavailable,
)
from ringserve.kv_transfer.nixl import select_transport
from ringserve.metrics import PREFILL_CHUNK_TOKENS, PREFILL_DEADLINES, PREFILL_PASS_SECONDS, PREFILL_QUEUE
from ringserve.prefill_service.calibration import calibrate
from ringserve.prefill_service.cost_model import CostModel
from ringserve.prefill_service.pass_runner import PassRunner
from ringserve.prefill_service.prefix_cache import CacheStart, CacheStats, PrefixIndex
from ringserve.prefill_service.protocol import ChunkWork, Job, Pass, PassReport
from ringserve.prefill_service.push import PushResult
from ringserve.prefill_service.scheduler import Chunk, QueuedPrompt, Scheduler, SchedulerConfig
from ringserve.prefill_service.sharding import chunk_blocks, plan_pass

log = logging.getLogger(__name__)


@dataclass
class Prefilled:
    """A finished request, as the leader sees it."""

    logits: torch.Tensor  # the prompt's last token's [V]
    results: list[PushResult]  # one per world rank (TP x CP), leader first
    cached_tokens: int  # prompt tokens read from the prefix cache instead of computed
    strategy: str  # the ring variant of its last pass
    passes: int  # passes it took part in (its chunks)
    queued_s: float  # from submission to its first pass
    compute_s: float  # its passes' forward time (shared with what was packed with it)


@dataclass
class _InFlight:
    """The leader's record of a request from submission to its future's result."""

    job: Job
    hashes: list[bytes]
    future: Future
    submitted: float
    start: CacheStart | None = None  # set when it starts (its blocks are reserved)
    begun: bool = False  # its first chunk has been sent to the ranks
    owners: dict[int, int] = field(default_factory=dict)  # prompt block -> rank that computed it
    first_pass: float | None = None
    compute_s: float = 0.0
    pushing: bool = False  # its last chunk has run: its pushes are in flight; it can no longer be dropped
    logits: torch.Tensor | None = None  # set with its last chunk's pass
    strategy: str = ""
    passes: int = 0
    pushed: dict[int, PushResult] = field(default_factory=dict)  # world rank -> its push's result


class PrefillGroup:
    """The leader's handle on its group: start the ranks, take requests, schedule passes, stop."""

    def __init__(self, cfg: PrefillConfig):
        if cfg.cp < 1 or cfg.tp < 1:
            raise FailedPrecondition(f"--cp and --tp must be at least 1, got --cp {cfg.cp} --tp {cfg.tp}")
        if not 0.0 <= cfg.prefix_cache <= 1.0:
            raise InvalidArgument(
                f"--prefix-cache is the share of KV blocks the prefix cache may keep, from 0 (off) to 1; "
                f"got {cfg.prefix_cache}"
            )
        sched_cfg = SchedulerConfig(
            policy=cfg.schedule,
            target_pass_s=cfg.target_pass_s,
            max_overhead=cfg.max_pass_overhead,
            chunk_unit=cfg.block_size * cfg.cp,
            max_pass_tokens=cfg.max_pass_tokens,
            ttft_min_s=cfg.ttft_min_s,
            ttft_factor=cfg.ttft_factor,
            reject_late=cfg.reject_late,
        )
        self.cost = CostModel()
        self.scheduler = Scheduler(sched_cfg, self.cost)  # validates the scheduler flags before anything starts
        # Decided once, by the leader, for every rank.
        cfg = dataclasses.replace(cfg, kv_transfer=select_transport(cfg.kv_transfer))
        self.cfg, self.transport = cfg, cfg.kv_transfer
        self.index = PrefixIndex(cfg.cp, cfg.kv_blocks, int(cfg.prefix_cache * cfg.kv_blocks), cfg.block_size)
        self.broken = False
        self._requests: dict[str, _InFlight] = {}
        self._cancelled: set[str] = set()
        self._drop: list[str] = []
        self._finishing: list[_InFlight] = []  # answered, every push over: their blocks are freed next pass
        self._closing = False
        self._wake = threading.Condition()  # guards everything above; the loop waits on it for work
        # Told once, with what happened, when the group breaks (the service leaves the registry and exits).
        self.on_broken: Callable[[str], None] | None = None
        self.ranks = PassRunner(cfg, self._push_done)
        self.runner, self.pusher = self.ranks.runner, self.ranks.pusher
        calibrate(self.ranks, self.cost, self.model.config)
        self._loop_thread = threading.Thread(target=self._loop, name="prefill-scheduler", daemon=True)
        self._loop_thread.start()

    @property
    def model(self) -> Llama:
        return self.runner.model

    @property
    def procs(self) -> list[mp.Process]:
        """The ranks this process started (ranks 1..), as processes."""
        return self.ranks.link.procs

    # -- requests --------------------------------------------------------------------------------

    def submit(self, job: Job) -> Future:
        """Queue a request; the future gives its ``Prefilled`` or raises its error.

        Raises at once (nothing queued) ResourceExhausted if the prompt cannot fit the group,
        DeadlineExceeded if the scheduler refuses late requests and this one cannot make it,
        InvalidArgument for a request id already in flight, Unavailable if the group is broken.
        """
        self.index.check_fits(len(job.token_ids))
        hashes = block_hashes(job.token_ids, self.cfg.block_size)
        with self._wake:
            if self.broken or self._closing:
                raise Unavailable("prefill group is broken (a rank died) or stopping; send the request elsewhere")
            cached = self.index.cached_tokens(hashes, len(job.token_ids))
            now = time.monotonic()
            try:
                self.scheduler.add(job.request_id, len(job.token_ids), cached, now, job.ttft_s)
            except DeadlineExceeded:
                PREFILL_DEADLINES.labels("rejected").inc()
                raise
            future: Future = Future()
            self._requests[job.request_id] = _InFlight(job, hashes, future, now)
            PREFILL_QUEUE.set(len(self._requests))
            self._wake.notify()
        return future

    def cancel(self, request_id: str) -> None:
        """Give up a request (its client went away): it ends with Cancelled and frees its blocks
        at the next pass boundary. Unknown or finished ids are ignored."""
        with self._wake:
            if request_id in self._requests:
                self._cancelled.add(request_id)
                self._wake.notify()

    # -- the scheduling loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                for request_id in self._cancelled & self._requests.keys():
                    if not self._requests[request_id].pushing:  # a push ends on its own, soon
                        self._abandon(request_id, Cancelled(f"request {request_id} cancelled by its client"))
                self._cancelled.clear()
                now = time.monotonic()
                for r in self.scheduler.expire(now):
                    self._abandon(r.request_id, self._late_error(r, now))
                if self._closing:
                    for request_id, flight in list(self._requests.items()):
                        if not flight.pushing:
                            self._abandon(request_id, Unavailable("prefill group stopped; retry on another group"))
                chunks = self.scheduler.next_pass(now, self._try_start)
                idle = not chunks and not self._drop and not self._finishing
                if idle and self._closing and not self._requests:
                    return
                if idle:
                    self._wake.wait(timeout=1.0)
                    if not (dead := self.ranks.lost()):
                        continue
                else:
                    p = self._build_pass(chunks)
            if idle:  # a rank died between passes: nothing runs on this group any more
                self.ranks.free_all()
                self._fail_all(Unavailable(f"prefill group: {', '.join(dead)} died; restart the prefill group"))
                return
            try:
                logits, reports = self._run_pass(p)
            except RingserveError as e:
                self._fail_all(e)
                return
            if chunks:
                self._pass_done(chunks, p, logits, reports)

    def _try_start(self, request: QueuedPrompt) -> bool:
        """The scheduler's hook before a request's first chunk: reserve its blocks, or say wait."""
        flight = self._requests[request.request_id]
        flight.start = self.index.start(flight.hashes, request.num_tokens)
        if flight.start is None:
            return False
        request.num_done = len(flight.start.hit) * self.cfg.block_size  # what the cache really gives
        return True

    def _build_pass(self, chunks: list[Chunk]) -> Pass:
        bs, world = self.cfg.block_size, self.cfg.cp
        work = []
        for c in chunks:
            flight = self._requests[c.request_id]
            plan = plan_pass(c.num_tokens, world, bs)
            for r in range(world):
                flight.owners.update((j, r) for j in chunk_blocks(plan, c.start, r, bs))
            work.append(
                ChunkWork(
                    c.request_id,
                    flight.job.token_ids[c.start : c.start + c.num_tokens],
                    c.start,
                    begin=None if flight.begun else flight.start,
                    last=c.last,
                    targets=tuple(flight.job.targets) if c.last else (),
                )
            )
            flight.begun = True
            flight.pushing = c.last
            PREFILL_CHUNK_TOKENS.observe(c.num_tokens)
        drop, self._drop = tuple(self._drop), []
        # The index keeps a pushing request's blocks reserved (and its prefix pinned) until here.
        finish = tuple(
            (f.job.request_id, self.index.finish(f.hashes, f.start, f.owners, keep=True)) for f in self._finishing
        )
        self._finishing = []
        # The ring variant the most urgent request asked for.
        strategy = self._requests[chunks[0].request_id].job.strategy if chunks else self.cfg.strategy
        return Pass(tuple(work), strategy, self.index.take_evictions(), drop, finish)

    def _run_pass(self, p: Pass) -> tuple[list[torch.Tensor], list[PassReport]]:
        """Run a scheduled pass on every rank, then check every rank's block count; any failure
        breaks the group."""
        try:
            logits, reports = self.ranks.run(p)
        except RingserveError:
            self.broken = True
            raise
        self._check_blocks(reports)
        return logits, reports

    def _check_blocks(self, reports: list[PassReport]) -> None:
        # A rank holds exactly what the index says: cached blocks plus those of requests in flight.
        # Any other count means a rank did not carry out a decision; the group is out of step.
        # (Requests started by the scheduler but not yet sent to the ranks have their blocks
        # reserved in the index only.)
        unsent = [f.start.new_blocks for f in self._requests.values() if f.start is not None and not f.begun]
        for r in reports:  # the TP ranks of one CP rank hold the same blocks (the same tables)
            cp_rank = r.rank // self.cfg.tp
            expected = self.index.held[cp_rank] + self.index.reserved[cp_rank] - sum(n[cp_rank] for n in unsent)
            if r.blocks_used != expected:
                self.broken = True
                raise FailedPrecondition(
                    f"prefill rank {r.rank} holds {r.blocks_used} KV blocks after a pass, the leader's "
                    f"index says {expected}; restart the prefill group"
                )

    def _pass_done(self, chunks: list[Chunk], p: Pass, logits, reports: list[PassReport]) -> None:
        seconds = max(r.forward_s for r in reports)  # the slowest rank's forward is the pass's
        now = time.monotonic()
        with self._wake:
            predicted = self.cost.predict([(c.num_tokens, c.start) for c in chunks])
            finished = {r.request_id: r for r in self.scheduler.pass_done(chunks, seconds, now)}
            PREFILL_PASS_SECONDS.observe(seconds)
            log.debug(
                "pass: chunks %s tokens, %.3f s (predicted %.3f), %d request(s) in flight",
                [c.num_tokens for c in chunks],
                seconds,
                predicted,
                len(self._requests),
            )
            for i, c in enumerate(chunks):
                flight = self._requests[c.request_id]
                flight.compute_s += seconds
                if flight.first_pass is None:
                    flight.first_pass = now - seconds
                if not c.last:
                    continue
                request = finished[c.request_id]
                met = now <= request.deadline
                PREFILL_DEADLINES.labels("met" if met else "missed").inc()
                log.info(
                    "request_id=%s ttft_deadline=%s passes=%d queued=%.3fs slack_at_end=%.3fs",
                    c.request_id,
                    "met" if met else "missed",
                    request.passes,
                    flight.first_pass - flight.submitted,
                    request.deadline - now,
                )
                flight.logits, flight.passes = logits[i], request.passes
                flight.strategy = self.runner.last_strategy or p.strategy
                self._resolve_if_pushed(flight)

    def _push_done(self, result: PushResult) -> None:
        """A rank's push of a request is over (from its push stage, at any time)."""
        with self._wake:
            flight = self._requests.get(result.request_id)
            if flight is None or not flight.pushing:  # the group failed meanwhile
                return
            flight.pushed[result.rank] = result
            self._resolve_if_pushed(flight)

    def _resolve_if_pushed(self, flight: _InFlight) -> None:
        """Answer a request once its last pass is done and every rank's push is over (with
        ``_wake`` held); its blocks are freed by the next pass, and its NIXL targets hear that
        nothing more will be written."""
        if flight.logits is None or len(flight.pushed) < self.ranks.world:
            return
        results = [flight.pushed[r] for r in range(self.ranks.world)]
        error = next((r.error for r in results if r.error), None)
        outcome = (
            Aborted(error[1])
            if error
            else Prefilled(
                flight.logits,
                results,
                len(flight.start.hit) * self.cfg.block_size,
                flight.strategy,
                flight.passes,
                flight.first_pass - flight.submitted,
                flight.compute_s,
            )
        )
        self._finishing.append(flight)
        self._end(flight.job.request_id, outcome)
        self.pusher.notify_done(flight.job.request_id, tuple(flight.job.targets))
        self._wake.notify()

    def _end(self, request_id: str, outcome: Prefilled | BaseException) -> None:
        """Resolve a request's future and forget it (with ``_wake`` held)."""
        flight = self._requests.pop(request_id)
        self._cancelled.discard(request_id)
        PREFILL_QUEUE.set(len(self._requests))
        if isinstance(outcome, BaseException):
            flight.future.set_exception(outcome)
        else:
            flight.future.set_result(outcome)

    def _abandon(self, request_id: str, error: RingserveError) -> None:
        """End a request that will not finish (with ``_wake`` held); a started one's blocks are
        freed by the next pass (``Pass.drop``)."""
        self.scheduler.cancel(request_id)
        flight = self._requests[request_id]
        if flight.start is not None:
            self.index.finish(flight.hashes, flight.start, {}, keep=False)
            if flight.begun:
                self._drop.append(request_id)
        self._end(request_id, error)
        self.pusher.notify_done(request_id, tuple(flight.job.targets))  # it never pushed: nothing will land

    def _late_error(self, request: QueuedPrompt, now: float) -> RingserveError:
        PREFILL_DEADLINES.labels("rejected").inc()
        return DeadlineExceeded(
            f"request {request.request_id} cannot meet its time-to-first-token deadline: it needs about "
            f"{self.cost.remaining_s(request.num_tokens, request.num_done):.2f} s and "
            f"{max(0.0, request.deadline - now):.2f} s are left; retry with a longer ttft_slo_seconds "
            "or on a less loaded group"
        )

    def _fail_all(self, error: RingserveError) -> None:
        """The group broke: every request in flight ends with the error; the rank-0 blocks are
        already freed (``run_pass``), and the index forgets the reservations."""
        log.error("prefill group failed: %s", error)
        with self._wake:
            self.broken = True
            for request_id, flight in list(self._requests.items()):
                self.scheduler.cancel(request_id)
                if flight.start is not None:
                    self.index.finish(flight.hashes, flight.start, {}, keep=False)
                self._end(request_id, error)
            for flight in self._finishing:
                self.index.finish(flight.hashes, flight.start, {}, keep=False)
            self._drop, self._finishing = [], []
        if self.on_broken is not None:
            self.on_broken(str(error))

    # -- the prefix cache ------------------------------------------------------------------------

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """How many of a prompt's tokens the prefix cache holds right now (they cost no compute)."""
        return self.index.cached_tokens(block_hashes(token_ids, self.cfg.block_size), len(token_ids))

    def cache_changes(self) -> tuple[list[bytes], list[bytes]]:
        """Block hashes the prefix cache stored and evicted since the last call (for residency
        publishing); each call returns only what changed after the previous one."""
        return self.index.take_changes()

    def cache_stats(self) -> CacheStats:
        """Cached blocks per rank, capacity, and lookups / hits / hit tokens since start."""
        return self.index.stats()

    def close(self) -> None:
        """Stop: requests still queued or running end with Unavailable after the pass in
        progress, an idle group drops its prefix cache (``cache_changes`` then reports every block
        evicted), and the ranks exit."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._loop_thread.join(timeout=self.cfg.group_timeout_s)
        if not self.broken and not self.ranks.active:
            self.index.clear()
            self.ranks.blocks.clear()
        self.ranks.close()
        import torch.distributed as dist

        if dist.is_initialized():  # the leader's process may start another group later
            dist.destroy_process_group()
