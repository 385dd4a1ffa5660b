"""A prefill group: N processes, one per device, running CP prefill together; rank 0 leads.

The leader (the process serving gRPC) starts ranks 1..N-1 as child processes. Jobs reach them
through a queue, not a collective, so an idle group holds no collective that could time out;
once every rank has a job they run the CP forward over their process group, each pushes its KV
shard to the decode targets, and each reports back to the leader, which samples the first token.

The leader also decides, for each job, how the group's prefix cache serves it (``prefix_cache``):
the decision travels in the job, so every rank carries out the same one.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, replace

import torch

from ringserve.config import PrefillConfig
from ringserve.engine.kv_cache import KVCache, block_hashes
from ringserve.engine.model import Llama
from ringserve.errors import FailedPrecondition, InvalidArgument, RingserveError, Unavailable, error_from_code
from ringserve.kv_transfer.nixl import NixlEndpoint, select_transport
from ringserve.kv_transfer.plan import plan_moves
from ringserve.kv_transfer.tcp import send_kv
from ringserve.prefill_service.context_parallel import CPRunner
from ringserve.prefill_service.prefix_cache import CachePlan, CacheStats, PrefixIndex, RankBlocks
from ringserve.prefill_service.strategy import measure_rates
from ringserve.process_group import check_group, free_port, init_group, next_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A decode rank's share of a request's prompt KV."""

    address: str
    first_position: int
    num_tokens: int
    nixl_landing: bytes = b""  # empty: the decode rank takes this share over TCP only


@dataclass(frozen=True)
class Job:
    request_id: str
    token_ids: list[int]
    strategy: str
    targets: list[Target]
    cache: CachePlan = CachePlan()  # set by the leader (PrefillGroup.run)


@dataclass
class RankResult:
    """What one rank reports after a job: bytes pushed, or the error that stopped it."""

    rank: int
    bytes_sent: int = 0
    transfer_s: float = 0.0
    error: tuple[str, str] | None = None  # (status code name, message)
    blocks_used: int = 0  # the rank's allocated KV blocks after the job: its cached blocks only


def _device_for(cfg: PrefillConfig, rank: int) -> torch.device:
    dev = torch.device(cfg.device)
    return torch.device("cuda", rank) if dev.type == "cuda" else dev


def _build_runner(cfg: PrefillConfig, rank: int, init_method: str) -> tuple[CPRunner, RankBlocks, NixlEndpoint | None]:
    from ringserve.service import torch_dtype

    device = _device_for(cfg, rank)
    dtype = torch_dtype(cfg.dtype)
    model = Llama.load(cfg.model, dtype=dtype, device=device, progress=rank == 0)
    init_group(rank, cfg.cp, init_method, device, cfg.group_timeout_s)
    check_group(model, cfg.cp, dtype)
    cache = KVCache(model.config, cfg.kv_blocks, cfg.block_size, dtype=dtype, device=device)
    c = model.config
    rates = measure_rates(None, device, dtype, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    endpoint = NixlEndpoint(cache) if cfg.kv_transfer == "nixl" else None  # KV pool registered once
    return CPRunner(model, cache, strategy=cfg.strategy, rates=rates), RankBlocks(cache, rank, cfg.cp), endpoint


def run_job(
    runner: CPRunner, blocks: RankBlocks, job: Job, endpoint: NixlEndpoint | None = None
) -> tuple[torch.Tensor | None, RankResult]:
    """This rank's part of a job: CP forward over the cached prefix, push the KV shard (cached
    part and new part: the whole prompt), then keep the blocks the cache plan keeps, free the rest.

    Returns the last token's logits on rank 0. Transfer failures are reported, not raised, so
    every rank still reports; failures of the ring itself (a dead peer) raise.
    """
    import torch.distributed as dist

    hashes = block_hashes(job.token_ids, runner.cache.block_size)
    seq = blocks.begin(hashes, job.cache)
    result = RankResult(runner.rank)
    prefilled = False
    try:
        logits = runner.prefill(seq, job.token_ids[seq.num_done :], job.strategy)
        prefilled = True
        counts: list = [None] * runner.world
        with runner.comm.peer_errors():
            dist.all_gather_object(counts, seq.num_cached_local)
        t0 = time.perf_counter()
        try:
            result.bytes_sent = _push_kv(runner, seq, job, counts, endpoint)
        except RingserveError as e:
            result.error = (e.code, str(e))
        result.transfer_s = time.perf_counter() - t0
        return logits, result
    finally:
        blocks.finish(seq, hashes, job.cache, len(job.token_ids), keep=prefilled)
        result.blocks_used = runner.cache.allocator.num_used


def _push_kv(runner: CPRunner, seq, job: Job, counts: list[int], endpoint: NixlEndpoint | None) -> int:
    """Send this rank's KV rows to the decode ranks the plan gives them; returns bytes sent. With
    NIXL and a landing, rows go as WRITEs straight from this rank's blocks into the decode rank's;
    otherwise they are gathered and sent over TCP. Either way, returns once they have landed."""
    kv = None
    sent = 0
    moves = [m for m in plan_moves(counts, [t.num_tokens for t in job.targets]) if m.src_rank == runner.rank]
    for i, m in enumerate(moves):
        target = job.targets[m.dst_rank]
        if endpoint is not None and target.nixl_landing:
            sent += endpoint.push(
                seq.block_table, m.src_start, m.count, target.nixl_landing, m.dst_start, f"{runner.rank}.{i}"
            )
            continue
        if kv is None:
            table = runner.cache.table(seq.block_table)
            layers = runner.model.config.num_hidden_layers
            kv = torch.stack(
                [torch.stack(runner.cache.read(layer, table, seq.num_cached_local)) for layer in range(layers)]
            )
        rows = kv[:, :, m.src_start : m.src_start + m.count]  # [layers, 2, n, Hkv, D]
        sent += send_kv(target.address, job.request_id, target.first_position + m.dst_start, rows)
    return sent


def _worker_main(rank: int, cfg: PrefillConfig, init_method: str, jobs: mp.Queue, results: mp.Queue) -> None:
    from ringserve.logs import setup_logging

    setup_logging(f"prefill-rank{rank}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the leader stops us
    torch.set_num_threads(max(1, torch.get_num_threads() // cfg.cp))
    try:
        runner, blocks, endpoint = _build_runner(cfg, rank, init_method)
    except RingserveError as e:
        results.put(RankResult(rank, error=(e.code, str(e))))
        return
    results.put(RankResult(rank))  # ready
    parent = os.getppid()
    try:
        while (job := next_message(jobs, parent)) is not None:
            try:
                _, result = run_job(runner, blocks, job, endpoint)
            except RingserveError as e:
                result = RankResult(rank, error=(e.code, str(e)), blocks_used=runner.cache.allocator.num_used)
            results.put(result)
            if result.error and result.error[0] == "UNAVAILABLE" and "peer rank" in result.error[1]:
                return  # the group is broken; the leader restarts or fails over
    finally:
        if endpoint is not None:
            endpoint.close()


@dataclass
class Prefilled:
    """A finished job, as the leader sees it."""

    logits: torch.Tensor  # the prompt's last token's [V]
    results: list[RankResult]  # one per rank, leader first
    cached_tokens: int  # prompt tokens read from the prefix cache instead of computed


class PrefillGroup:
    """The leader's handle on its group: start the ranks, run jobs one at a time, stop."""

    def __init__(self, cfg: PrefillConfig):
        if cfg.cp < 1:
            raise FailedPrecondition(f"--cp must be at least 1, got {cfg.cp}")
        if not 0.0 <= cfg.prefix_cache <= 1.0:
            raise InvalidArgument(
                f"--prefix-cache is the share of KV blocks the prefix cache may keep, from 0 (off) to 1; "
                f"got {cfg.prefix_cache}"
            )
        # Decided once, by the leader, for every rank.
        cfg = dataclasses.replace(cfg, kv_transfer=select_transport(cfg.kv_transfer))
        self.cfg, self.transport = cfg, cfg.kv_transfer
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.results: mp.Queue = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(cfg.cp - 1)]
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, cfg, init_method, self.jobs[r - 1], self.results),
                name=f"prefill-rank{r}",
                daemon=True,
            )
            for r in range(1, cfg.cp)
        ]
        torch.set_num_threads(max(1, torch.get_num_threads() // cfg.cp))
        for p in self.procs:
            p.start()
        self.runner, self.blocks, self.endpoint = _build_runner(cfg, 0, init_method)
        for result in self._collect():
            if result.error:
                raise error_from_code(*result.error)
        self.index = PrefixIndex(cfg.cp, cfg.kv_blocks, int(cfg.prefix_cache * cfg.kv_blocks), cfg.block_size)
        self.broken = False
        self._lock = threading.Lock()  # one job at a time; close() must not free blocks a job reads

    @property
    def model(self) -> Llama:
        return self.runner.model

    def _collect(self) -> list[RankResult]:
        """One result from every other rank; a rank that died or hangs past the timeout fails the group."""
        got: list[RankResult] = []
        deadline = time.monotonic() + self.cfg.group_timeout_s
        while len(got) < len(self.procs):
            try:
                got.append(self.results.get(timeout=0.2))
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.broken = True
                    raise Unavailable(
                        f"prefill group: {', '.join(dead) or 'a rank'} "
                        f"{'died' if dead else 'did not answer in time'}; restart the prefill group"
                    ) from None
        return got

    def run(self, job: Job) -> Prefilled:
        """Run a job on every rank, reusing what the prefix cache holds of its prompt.

        Raises ResourceExhausted, before any rank starts, if the prompt does not fit the group.
        """
        with self._lock:
            return self._run(job)

    def _run(self, job: Job) -> Prefilled:
        if self.broken:
            raise Unavailable("prefill group is broken (a rank died); restart it")
        hashes = block_hashes(job.token_ids, self.cfg.block_size)
        job = replace(job, cache=self.index.plan(hashes, len(job.token_ids)))
        for q in self.jobs:
            q.put(job)
        try:
            logits, mine = run_job(self.runner, self.blocks, job, self.endpoint)
        except Exception:  # the other ranks are stuck in (or past) this job's ring
            self.broken = True
            raise
        results = [mine, *self._collect()]
        self.index.commit(hashes, job.cache)
        # Between jobs a rank's cache is the only holder of its blocks; any other count means
        # the rank did not carry out the plan, and its cache no longer matches the index.
        out_of_step = [r for r in results if r.blocks_used != self.index.held[r.rank]]
        if out_of_step:
            self.broken = True
        for r in results:
            if r.error:
                if "peer rank" in r.error[1]:
                    self.broken = True
                raise error_from_code(*r.error)
        if out_of_step:
            r = out_of_step[0]
            raise FailedPrecondition(
                f"prefix cache out of step: prefill rank {r.rank} holds {r.blocks_used} KV blocks after a "
                f"request, the leader's index says {self.index.held[r.rank]}; restart the prefill group"
            )
        return Prefilled(logits, results, job.cache.hit_blocks * self.cfg.block_size)

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
        """Stop the ranks. An idle group first drops its prefix cache (``cache_changes`` then
        reports every block evicted); a group stopped mid-job does not wait for the job."""
        if self._lock.acquire(blocking=False):
            try:
                self.index.clear()
                self.blocks.clear()
            finally:
                self._lock.release()
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        if self.endpoint is not None:
            self.endpoint.close()
