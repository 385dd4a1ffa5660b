"""A prefill group: N processes, one per device, running CP prefill together; rank 0 leads.

The leader (the process serving gRPC) starts ranks 1..N-1 as child processes and runs the
scheduler. Requests are prefilled in passes (Medha, Agrawal et al.): each pass is a chunk of one
long prompt, or chunks of several prompts packed together, picked least-remaining-slack first
(``scheduler.Scheduler``). A long prompt's later chunks attend to the KV its earlier chunks left
in the ranks' caches (partial prefill), so a short request waits at most about one pass, never
for a whole long prompt. A request is preempted only between chunks, and keeps its KV.

The leader sends each pass to every rank through a queue, not a collective, so an idle group
holds no collective that could time out. Every rank runs its share of the pass over the group's
process group; after a request's last chunk each rank hands its KV shard to its push stage
(``push.Pusher``: threads of its own, so the next pass starts at once), and the leader answers
the request when every rank's push is over. A push failure fails only its request (ABORTED).

Every decision about blocks (which cached blocks a request reads, which it evicts, which new
blocks the prefix cache keeps) is the leader's (``prefix_cache.PrefixIndex``) and travels in the
pass, so every rank carries out the same one, in the same order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ringserve.config import PrefillConfig
from ringserve.engine.kv_cache import KVCache, block_hashes
from ringserve.engine.model import Llama
from ringserve.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    RingserveError,
    Unavailable,
    error_from_code,
)
from ringserve.kv_transfer.nixl import NixlEndpoint, select_transport
from ringserve.kv_transfer.secret import deployment_secret
from ringserve.metrics import PREFILL_CHUNK_TOKENS, PREFILL_DEADLINES, PREFILL_PASS_SECONDS, PREFILL_QUEUE
from ringserve.prefill_service.context_parallel import CPRunner
from ringserve.prefill_service.prefix_cache import (
    CacheStart,
    CacheStats,
    PrefixIndex,
    RankBlocks,
    RankSeq,
    new_blocks_per_rank,
)
from ringserve.prefill_service.push import Pusher, PushResult, Target
from ringserve.prefill_service.scheduler import (
    Chunk,
    CostModel,
    Request,
    Scheduler,
    SchedulerConfig,
    calibration_shapes,
)
from ringserve.prefill_service.sharding import chunk_blocks, plan_pass
from ringserve.prefill_service.strategy import measure_rates
from ringserve.process_group import check_group, free_port, init_group, next_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A request as the group takes it."""

    request_id: str
    token_ids: list[int]
    strategy: str
    targets: list[Target]  # where its KV goes; empty: nowhere (the prefill alone is wanted)
    ttft_s: float | None = None  # its time-to-first-token budget; None: the scheduler's default


@dataclass(frozen=True)
class ChunkWork:
    """One request's part of a pass, as every rank gets it."""

    request_id: str
    token_ids: list[int]  # the chunk's tokens
    start: int  # the chunk's first token in the prompt
    begin: CacheStart | None = None  # the request's first chunk: take its cached prefix, allocate its blocks
    last: bool = False  # completes the prompt: push the KV to ``targets`` (blocks held until ``Pass.finish``)
    targets: tuple[Target, ...] = ()


@dataclass(frozen=True)
class Pass:
    """One iteration of the group, the same message to every rank."""

    work: tuple[ChunkWork, ...]
    strategy: str  # the ring variant asked for ("auto" lets each rank's rule pick; they agree)
    evict: tuple[bytes, ...] = ()  # cached blocks to free first
    drop: tuple[str, ...] = ()  # started requests that were cancelled: free their blocks
    # Requests whose pushes are over on every rank: (request id, (prompt block, rank, hash) the
    # prefix cache keeps); the rest of their blocks are freed.
    finish: tuple[tuple[str, tuple[tuple[int, int, bytes], ...]], ...] = ()


@dataclass
class PassReport:
    """What one rank reports after a pass."""

    rank: int
    forward_s: float = 0.0  # the model forward
    blocks_used: int = 0  # allocated KV blocks after the pass
    error: tuple[str, str] | None = None  # the pass itself failed here


def _device_for(cfg: PrefillConfig, rank: int) -> torch.device:
    dev = torch.device(cfg.device)
    return torch.device("cuda", rank) if dev.type == "cuda" else dev


def _build_runner(cfg: PrefillConfig, rank: int, init_method: str) -> tuple[CPRunner, RankBlocks, NixlEndpoint | None]:
    from ringserve.service import torch_dtype

    device = _device_for(cfg, rank)
    dtype = torch_dtype(cfg.dtype)
    model = Llama.load(cfg.model, dtype=dtype, device=device, progress=rank == 0, load_format=cfg.load_format)
    init_group(rank, cfg.cp, init_method, device, cfg.group_timeout_s)
    check_group(model, cfg.cp, dtype)
    cache = KVCache(model.config, cfg.kv_blocks, cfg.block_size, dtype=dtype, device=device)
    c = model.config
    rates = measure_rates(None, device, dtype, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    key = deployment_secret(cfg.deployment_secret_file)
    endpoint = NixlEndpoint(cache, landing_key=key) if cfg.kv_transfer == "nixl" else None  # pool registered once
    return CPRunner(model, cache, strategy=cfg.strategy, rates=rates), RankBlocks(cache, rank, cfg.cp), endpoint


def run_pass(
    runner: CPRunner, blocks: RankBlocks, active: dict[str, RankSeq], p: Pass, pusher: Pusher
) -> tuple[list[torch.Tensor] | None, PassReport]:
    """This rank's part of a pass: carry out the leader's block decisions, run the CP forward over
    every chunk, then hand each finished request's KV shard (its cached part and new part: the
    whole prompt) to the push stage. A request's blocks stay in ``active`` until a later pass's
    ``finish`` (sent once every rank's push is over) says which the prefix cache keeps.

    Returns each chunk's last token's logits on rank 0. Failures of the ring itself (a dead peer)
    raise, after freeing every request's blocks on this rank.
    """
    import torch.distributed as dist

    report = PassReport(runner.rank)
    try:
        blocks.evict(p.evict)
        for request_id, store in p.finish:
            blocks.finish(active.pop(request_id), store)
        for request_id in p.drop:
            blocks.finish(active.pop(request_id), ())
        for w in p.work:
            if w.begin is not None:
                active[w.request_id] = blocks.begin(w.begin)
        if not p.work:  # a pass that only frees blocks
            report.blocks_used = runner.cache.allocator.num_used
            return None, report
        seqs = [active[w.request_id] for w in p.work]
        bs = runner.cache.block_size
        for rs, w in zip(seqs, p.work):
            rs.prompt_blocks += chunk_blocks(plan_pass(len(w.token_ids), runner.world, bs), w.start, runner.rank, bs)
        t0 = time.perf_counter()
        logits = runner.prefill([rs.seq for rs in seqs], [w.token_ids for w in p.work], p.strategy)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        report.forward_s = time.perf_counter() - t0
        finished = [(w, rs) for w, rs in zip(p.work, seqs) if w.last]
        if finished:
            counts: list = [None] * runner.world
            with runner.comm.peer_errors():
                dist.all_gather_object(counts, [rs.seq.num_cached_local for _, rs in finished])
            for i, (w, rs) in enumerate(finished):
                pusher.submit(w.request_id, rs.seq, w.targets, [c[i] for c in counts])
    except BaseException:
        for rs in active.values():  # the group is broken: nothing of this rank's requests stays held
            blocks.finish(rs, ())
        active.clear()
        raise
    report.blocks_used = runner.cache.allocator.num_used
    return logits, report


def _worker_main(rank: int, cfg: PrefillConfig, init_method: str, inbox: mp.Queue, reports: mp.Queue) -> None:
    from ringserve.logs import setup_logging

    setup_logging(f"prefill-rank{rank}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the leader stops us
    torch.set_num_threads(max(1, torch.get_num_threads() // cfg.cp))
    try:
        runner, blocks, endpoint = _build_runner(cfg, rank, init_method)
    except RingserveError as e:
        reports.put(PassReport(rank, error=(e.code, str(e))))
        return
    pusher = Pusher(  # results go straight to the leader
        runner, endpoint, reports.put, cfg.kv_push_timeout_s, deployment_secret(cfg.deployment_secret_file)
    )
    reports.put(PassReport(rank))  # ready
    parent = os.getppid()
    active: dict[str, RankSeq] = {}
    try:
        while (p := next_message(inbox, parent)) is not None:
            try:
                _, report = run_pass(runner, blocks, active, p, pusher)
            except RingserveError as e:
                report = PassReport(rank, error=(e.code, str(e)), blocks_used=runner.cache.allocator.num_used)
            reports.put(report)
            if report.error and report.error[0] == "UNAVAILABLE" and "peer rank" in report.error[1]:
                return  # the group is broken; the leader fails its requests and restarts
    finally:
        pusher.close()
        if endpoint is not None:
            endpoint.close()


@dataclass
class Prefilled:
    """A finished request, as the leader sees it."""

    logits: torch.Tensor  # the prompt's last token's [V]
    results: list[PushResult]  # one per rank, leader first
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
    pushed: dict[int, PushResult] = field(default_factory=dict)  # rank -> its push's result


class PrefillGroup:
    """The leader's handle on its group: start the ranks, take requests, schedule passes, stop."""

    def __init__(self, cfg: PrefillConfig):
        if cfg.cp < 1:
            raise FailedPrecondition(f"--cp must be at least 1, got {cfg.cp}")
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
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.reports: mp.Queue = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(cfg.cp - 1)]
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, cfg, init_method, self.inboxes[r - 1], self.reports),
                name=f"prefill-rank{r}",
                daemon=True,
            )
            for r in range(1, cfg.cp)
        ]
        torch.set_num_threads(max(1, torch.get_num_threads() // cfg.cp))
        self.index = PrefixIndex(cfg.cp, cfg.kv_blocks, int(cfg.prefix_cache * cfg.kv_blocks), cfg.block_size)
        self.broken = False
        self._active: dict[str, RankSeq] = {}  # the leader rank's own sequences
        self._requests: dict[str, _InFlight] = {}
        self._cancelled: set[str] = set()
        self._drop: list[str] = []
        self._finishing: list[_InFlight] = []  # answered, every push over: their blocks are freed next pass
        self._closing = False
        self._wake = threading.Condition()  # guards everything above; the loop waits on it for work
        # Told once, with what happened, when the group breaks (the service leaves the registry and exits).
        self.on_broken: Callable[[str], None] | None = None
        # The other ranks' pass reports (for _collect) and push results (at any time) share a queue.
        self._pass_reports: queue.Queue[PassReport] = queue.Queue()
        self._reader = threading.Thread(target=self._read_reports, name="prefill-reports", daemon=True)
        self._reader.start()
        for p in self.procs:
            p.start()
        self.runner, self.blocks, self.endpoint = _build_runner(cfg, 0, init_method)
        self.pusher = Pusher(
            self.runner,
            self.endpoint,
            self._push_done,
            cfg.kv_push_timeout_s,
            deployment_secret(cfg.deployment_secret_file),
        )
        for report in self._collect():
            if report.error:
                raise error_from_code(*report.error)
        self._calibrate()
        self._loop_thread = threading.Thread(target=self._loop, name="prefill-scheduler", daemon=True)
        self._loop_thread.start()

    @property
    def model(self) -> Llama:
        return self.runner.model

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
                    dead = [f"{proc.name} (exit code {proc.exitcode})" for proc in self.procs if not proc.is_alive()]
                    if not dead:
                        continue
                else:
                    p = self._build_pass(chunks)
            if idle:  # a rank died between passes: nothing runs on this group any more
                for rs in self._active.values():
                    self.blocks.finish(rs, ())
                self._active.clear()
                self._fail_all(Unavailable(f"prefill group: {', '.join(dead)} died; restart the prefill group"))
                return
            try:
                logits, reports = self._run_pass(p)
            except RingserveError as e:
                self._fail_all(e)
                return
            if chunks:
                self._pass_done(chunks, p, logits, reports)

    def _try_start(self, request: Request) -> bool:
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
        """Run a scheduled pass on every rank, then check every rank's block count."""
        logits, reports = self._run_on_ranks(p)
        self._check_blocks(reports)
        return logits, reports

    def _run_on_ranks(self, p: Pass) -> tuple[list[torch.Tensor] | None, list[PassReport]]:
        """Send a pass to every rank, run rank 0's part, collect every report; any rank's error
        (or a dead rank) breaks the group and is raised."""
        for inbox in self.inboxes:
            inbox.put(p)
        try:
            logits, mine = run_pass(self.runner, self.blocks, self._active, p, self.pusher)
        except Exception as e:  # the other ranks are stuck in (or past) this pass's ring
            self.broken = True
            if isinstance(e, RingserveError):
                raise
            raise Unavailable(f"prefill group: the leader failed a pass ({type(e).__name__}: {e})") from e
        reports = [mine, *self._collect()]
        for r in reports:
            if r.error:
                self.broken = True
                raise error_from_code(*r.error)
        return logits, reports

    def _check_blocks(self, reports: list[PassReport]) -> None:
        # A rank holds exactly what the index says: cached blocks plus those of requests in flight.
        # Any other count means a rank did not carry out a decision; the group is out of step.
        # (Requests started by the scheduler but not yet sent to the ranks have their blocks
        # reserved in the index only.)
        unsent = [f.start.new_blocks for f in self._requests.values() if f.start is not None and not f.begun]
        for r in reports:
            expected = self.index.held[r.rank] + self.index.reserved[r.rank] - sum(n[r.rank] for n in unsent)
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
        if flight.logits is None or len(flight.pushed) < self.cfg.cp:
            return
        results = [flight.pushed[r] for r in range(self.cfg.cp)]
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

    def _late_error(self, request: Request, now: float) -> RingserveError:
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

    def _read_reports(self) -> None:
        """Route the other ranks' messages: pass reports to ``_collect``, push results as they come."""
        while (report := self.reports.get()) is not None:
            if isinstance(report, PushResult):
                self._push_done(report)
            else:
                self._pass_reports.put(report)

    def _collect(self) -> list[PassReport]:
        """One report from every other rank; a rank that died or hangs past the timeout fails the group."""
        got: list[PassReport] = []
        deadline = time.monotonic() + self.cfg.group_timeout_s
        while len(got) < len(self.procs):
            try:
                got.append(self._pass_reports.get(timeout=0.2))
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.broken = True
                    raise Unavailable(
                        f"prefill group: {', '.join(dead) or 'a rank'} "
                        f"{'died' if dead else 'did not answer in time'}; restart the prefill group"
                    ) from None
        return sorted(got, key=lambda r: r.rank)

    def _calibrate(self) -> None:
        """Fit the scheduler's cost model before serving: the passes of ``calibration_shapes`` (made-up
        prompts), every one run once untimed (first calls pay one-time costs: kernel plans), then timed
        ``repeats`` times; each shape's median counts (``CostModel.calibrate``). On a GPU the shapes
        reach long context and repeat 3 times, so two starts fit the same model; on CPU once, as
        short. The model goes on learning from every real pass."""
        bs, world = self.cfg.block_size, self.cfg.cp
        unit = bs * world
        top = max(unit, self.cfg.calibrate_tokens // unit * unit)
        while top > unit and max(new_blocks_per_rank(top, world, bs)) * 4 > self.cfg.kv_blocks:
            top = max(unit, top // 2 // unit * unit)  # every calibration pass fits the pool 4 times over
        on_gpu = self.cfg.device.startswith("cuda")
        shapes = calibration_shapes(top, unit, late_chunks=on_gpu)
        log.info("calibrating the prefill scheduler's cost model (%d shapes)", len(shapes))
        warm = [self._calibration_pass(i, shape) for i, shape in enumerate(shapes)]  # first calls: untimed
        # On a GPU, each shape for about a second of timed runs (3 to 10), interleaved with the others,
        # so a slow stretch (the decode tier loading beside us) spoils only some runs of each shape.
        repeats = [min(10, max(3, math.ceil(1.0 / max(w, 1e-3)))) if on_gpu else 1 for w in warm]
        times: list[list[float]] = [[] for _ in shapes]
        for r in range(max(repeats)):
            for i, shape in enumerate(shapes):
                if r < repeats[i]:
                    times[i].append(self._calibration_pass(i, shape))
        for shape, t in zip(shapes, times):
            log.debug("calibration %s: %s s", shape, ", ".join(f"{x:.4f}" for x in t))
        self.cost.calibrate(list(zip(shapes, times)))
        log.info("prefill cost model: %s", self.cost)

    def _calibration_pass(self, i: int, shape: list[tuple[int, int]]) -> float:
        """Run one calibration pass of made-up prompts (the tokens before a chunk as an untimed pass of
        their own) outside the scheduler and the index; its time, and its blocks freed."""
        bs, world = self.cfg.block_size, self.cfg.cp
        vocab = self.model.config.vocab_size
        prefix, work = [], []
        for k, (new, before) in enumerate(shape):
            name = f"calibration-{i}.{k}"
            begin = CacheStart((), new_blocks_per_rank(new + before, world, bs))
            ids = [(7 * t + k + 1) % vocab for t in range(new + before)]
            if before:
                prefix.append(ChunkWork(name, ids[:before], 0, begin))
                begin = None
            work.append(ChunkWork(name, ids[before:], before, begin))
        if prefix:
            self._run_on_ranks(Pass(tuple(prefix), self.cfg.strategy))
        _, reports = self._run_on_ranks(Pass(tuple(work), self.cfg.strategy))
        self._run_on_ranks(Pass((), self.cfg.strategy, drop=tuple(self._active)))
        return max(r.forward_s for r in reports)

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
        if not self.broken and not self._active:
            self.index.clear()
            self.blocks.clear()
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self.reports.put(None)
        self._reader.join(timeout=5)
        self.pusher.close()
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        import torch.distributed as dist

        if dist.is_initialized():  # the leader's process may start another group later
            dist.destroy_process_group()
