"""What every rank of a prefill group runs: load the model and join the group (``build_runner``),
carry out one pass (``run_pass``), and, on ranks 1..N-1, the loop that runs the leader's passes as
they come over the rank link (``rank_main``)."""

from __future__ import annotations

import time

import torch

from ringserve.config import PrefillConfig
from ringserve.engine.kv_cache import KVCache
from ringserve.engine.model import Llama
from ringserve.errors import RingserveError
from ringserve.kv_transfer.nixl import NixlEndpoint
from ringserve.kv_transfer.secret import deployment_secret
from ringserve.mesh import Layout, Mesh
from ringserve.prefill_service.context_parallel import CPRunner
from ringserve.prefill_service.prefix_cache import RankBlocks, RankSeq
from ringserve.prefill_service.protocol import Pass, PassReport
from ringserve.prefill_service.push import Pusher, SourceRank
from ringserve.prefill_service.sharding import chunk_blocks, plan_pass
from ringserve.prefill_service.strategy import measure_rates
from ringserve.process_group import check_group, init_group, join_and_load_tp
from ringserve.rank_link import RankLink


def device_for(cfg: PrefillConfig, rank: int) -> torch.device:
    """Rank r of a group uses GPU r."""
    dev = torch.device(cfg.device)
    return torch.device("cuda", rank) if dev.type == "cuda" else dev


def build_runner(
    cfg: PrefillConfig, rank: int, init_method: str, device: torch.device | None = None
) -> tuple[CPRunner, RankBlocks, NixlEndpoint | None, SourceRank]:
    """Load the model (this rank's TP shard), join the group's torch.distributed group (world
    rank ``rank`` of TP x CP, ``mesh.Layout``), allocate this rank's KV cache (its heads; on
    ``device``, default: the rank's GPU, or the CPU). Returns also where the rank sits in the
    layout, for its push stage."""
    from ringserve.service import torch_dtype

    device = device or device_for(cfg, rank)
    dtype = torch_dtype(cfg.dtype)
    if cfg.tp == 1:
        model = Llama.load(cfg.model, dtype=dtype, device=device, progress=rank == 0, load_format=cfg.load_format)
        init_group(rank, cfg.cp, init_method, device, cfg.group_timeout_s)
        mesh = Mesh(Layout(1, cfg.cp), rank, None, None)  # the CP group is the whole group; no TP collective
    else:
        model, mesh = join_and_load_tp(cfg, Layout(cfg.tp, cfg.cp), rank, init_method, device, dtype)
    check_group(model, cfg.cp, dtype, mesh.outer_group)
    cache = KVCache(model.config, cfg.kv_blocks, cfg.block_size, dtype=dtype, device=device)
    c = model.config
    rates = measure_rates(None, device, dtype, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    key = deployment_secret(cfg.deployment_secret_file)
    endpoint = NixlEndpoint(cache, landing_key=key) if cfg.kv_transfer == "nixl" else None  # pool registered once
    runner = CPRunner(model, cache, group=mesh.outer_group, strategy=cfg.strategy, rates=rates)
    full_kv_heads = (model.tp.full_config if model.tp else c).num_key_value_heads
    source = SourceRank(mesh.outer_rank, full_kv_heads, mesh.tp_rank, cfg.tp)
    return runner, RankBlocks(cache, mesh.outer_rank, cfg.cp), endpoint, source


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

    report = PassReport(dist.get_rank())  # the world rank: TP ranks of one CP rank report apart
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
                dist.all_gather_object(counts, [rs.seq.num_cached_local for _, rs in finished], group=runner.comm.group)
            for i, (w, rs) in enumerate(finished):
                pusher.submit(w.request_id, rs.seq, w.targets, [c[i] for c in counts])
    except BaseException:
        for rs in active.values():  # the group is broken: nothing of this rank's requests stays held
            blocks.finish(rs, ())
        active.clear()
        raise
    report.blocks_used = runner.cache.allocator.num_used
    return logits, report


def rank_main(link: RankLink, device: torch.device | None = None) -> None:
    """A rank other than the leader: build, say ready, then run each pass the leader sends until it
    hangs up (or dies); a broken ring ends the loop (the leader fails its requests and restarts).
    ``device``: this host's (a rank started on its own); default as ``device_for``."""
    cfg: PrefillConfig = link.config
    try:
        runner, blocks, endpoint, source = build_runner(cfg, link.rank, link.welcome.init_method, device)
    except RingserveError as e:
        link.send(PassReport(link.rank, error=(e.code, str(e))))
        return
    # Push results go straight to the leader, from the push stage's threads.
    secret = deployment_secret(cfg.deployment_secret_file)
    pusher = Pusher(runner, endpoint, link.send, cfg.kv_push_timeout_s, secret, source)
    link.send(PassReport(link.rank))  # ready
    active: dict[str, RankSeq] = {}
    try:
        while (p := link.recv()) is not None:
            try:
                _, report = run_pass(runner, blocks, active, p, pusher)
            except RingserveError as e:
                report = PassReport(link.rank, error=(e.code, str(e)), blocks_used=runner.cache.allocator.num_used)
            link.send(report)
            if report.error and report.error[0] == "UNAVAILABLE" and "peer rank" in report.error[1]:
                return
    finally:
        pusher.close()
        if endpoint is not None:
            endpoint.close()
