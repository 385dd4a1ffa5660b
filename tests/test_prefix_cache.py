"""The prefill tier's prefix cache: the leader's plans, and warm CP prefills equal to cold ones."""

import random

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks, values
from test_cp_model import single_process_kv
from test_model import run_chunks, tiny_hf

from ringserve.engine.config import ModelConfig
from ringserve.engine.kv_cache import KVCache, block_hashes
from ringserve.engine.model import Llama
from ringserve.errors import ResourceExhausted
from ringserve.kv_transfer.tcp import KVReceiver
from ringserve.prefill_service.context_parallel import CPRunner
from ringserve.prefill_service.group import Job, Target, run_job
from ringserve.prefill_service.prefix_cache import PrefixIndex, RankBlocks
from ringserve.prefill_service.sharding import plan_pass

BLOCK = 8


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(97) for _ in range(n)]


def run_index(index: PrefixIndex, ids: list[int]):
    """Plan and commit one prompt, as the leader does around a job."""
    hashes = block_hashes(ids, index.block_size)
    plan = index.plan(hashes, len(ids))
    index.commit(hashes, plan)
    return plan, hashes


def assert_prefix_closed(index: PrefixIndex, prompts: list[list[int]]) -> None:
    """Every cached block's parent is cached too: eviction never strands a block."""
    for ids in prompts:
        cached = [h in index.owner for h in block_hashes(ids, index.block_size)]
        assert cached == sorted(cached, reverse=True), cached


# -- The leader's plans (no processes) -------------------------------------------------------------


def test_full_hit_recomputes_the_last_block_and_stores_nothing_twice():
    index = PrefixIndex(world=2, kv_blocks=16, capacity=16, block_size=4)
    ids = tokens(12, 0)  # exactly 3 blocks
    cold, hashes = run_index(index, ids)
    assert cold.hit_blocks == 0 and [j for j, _ in cold.store] == [0, 1, 2]
    warm, _ = run_index(index, ids)
    assert warm.hit_blocks == 2 and warm.store == () and warm.evict == ()  # one token left to compute
    stats = index.stats()
    assert (sum(stats.blocks), stats.lookups, stats.hits, stats.hit_tokens) == (3, 2, 1, 8)
    stored, evicted = index.take_changes()
    assert stored == hashes and evicted == []
    assert index.take_changes() == ([], [])
    # The lookup the servicer queues work by: what a job would reuse, with no side effect.
    assert index.cached_tokens(hashes, 12) == 8 and index.cached_tokens(hashes, 13) == 12
    assert index.cached_tokens(block_hashes(tokens(12, 9), 4), 12) == 0
    assert index.stats().lookups == 2


def test_lru_evicts_leaves_first_and_never_what_the_job_reads():
    index = PrefixIndex(world=2, kv_blocks=6, capacity=6, block_size=4)
    a, b = tokens(24, 1), tokens(24, 2)  # 6 blocks each, 3 per rank
    _, ha = run_index(index, a)
    _, hb = run_index(index, b)
    assert index.held == [6, 6]
    # a's first 4 blocks are the least recently used, but this job reads them.
    plan, _ = run_index(index, a[:16] + tokens(12, 3))
    assert plan.hit_blocks == 4
    assert not set(plan.evict) & set(ha[:4])
    assert plan.evict[:2] == (ha[5], ha[4])  # a's own leaves go first, deepest first
    assert index.held[0] <= 6 and index.held[1] <= 6
    assert_prefix_closed(index, [a, b])
    assert sorted(index.take_changes()[1]) == sorted(plan.evict)


def test_capacity_keeps_fewer_new_blocks_deepest_dropped_first():
    index = PrefixIndex(world=2, kv_blocks=16, capacity=2, block_size=4)
    ids = tokens(40, 4)  # 10 blocks, 5 per rank
    plan, _ = run_index(index, ids)
    # Blocks 0-1 are on rank 0, 2-3 on rank 1; 4-6 (rank 1) and 7-9 (rank 0) do not fit.
    assert plan.store == ((0, 0), (1, 0), (2, 1), (3, 1))
    assert index.held == [2, 2]


def test_capacity_zero_is_off():
    index = PrefixIndex(world=2, kv_blocks=16, capacity=0, block_size=4)
    ids = tokens(30, 5)
    for _ in range(2):
        plan, _ = run_index(index, ids)
        assert (plan.hit_blocks, plan.store, plan.evict) == (0, (), ())
    assert index.held == [0, 0] and index.take_changes() == ([], [])


def test_prefix_piled_on_one_rank_falls_back_to_a_cold_run():
    """Short turns put every full block on rank 1 (rank 0 takes each pass's partial last block);
    a long next turn does not fit next to that prefix, so it runs cold and keeps nothing."""
    index = PrefixIndex(world=2, kv_blocks=6, capacity=6, block_size=4)
    base = tokens(100, 6)
    for turn in range(4):
        plan, _ = run_index(index, base[: 4 * turn + 5])
        assert plan.hit_blocks == turn
    assert index.held == [0, 4]
    plan, hashes = run_index(index, base[:16] + tokens(24, 7))
    assert plan.hit_blocks == 0 and plan.store == ()
    assert plan.evict == (hashes[3], hashes[2], hashes[1])
    assert index.held == [0, 1]


def test_prompt_too_long_for_the_group_is_resource_exhausted():
    index = PrefixIndex(world=2, kv_blocks=4, capacity=4, block_size=4)
    with pytest.raises(ResourceExhausted, match="needs 5 KV blocks on one rank.*has 4"):
        index.plan(block_hashes(tokens(40, 8), 4), 40)


# -- CP groups (gloo) with a tiny model ------------------------------------------------------------


def serve_prompts(rank, world, config_dict, state, prompts, kv_blocks):
    """Run prompts one after another through one CP group as PrefillGroup.run does: the leader
    plans and sends the job, every rank runs ``run_job``, which pushes the whole prompt's KV to a
    receiver (the decode tier's stand-in) on rank 0. Rank 0 returns, per prompt, the plan, the
    logits, the landed KV in prompt order and each rank's block counts; then the caches clear."""
    model = Llama.from_state_dict(ModelConfig.from_hf(config_dict), state)
    cache = KVCache(model.config, kv_blocks, BLOCK)
    runner, blocks = CPRunner(model, cache), RankBlocks(cache, rank, world)
    index = receiver = None
    landed: dict[str, list] = {}
    if rank == 0:
        index = PrefixIndex(world, kv_blocks, kv_blocks, BLOCK)
        receiver = KVReceiver(lambda rid, first, kv: landed.setdefault(rid, []).append((first, kv.clone())))
    out = []
    for i, ids in enumerate(prompts):
        hashes = block_hashes(ids, BLOCK)
        box = [None]
        if rank == 0:
            box = [Job(f"r{i}", ids, "auto", [Target(receiver.address, 0, len(ids))], index.plan(hashes, len(ids)))]
        dist.broadcast_object_list(box, src=0)
        job = box[0]
        logits, result = run_job(runner, blocks, job)
        # This rank's rows, in the order it pushed them: its blocks of the cached prefix, then its pieces.
        cached = job.cache.hit_blocks * BLOCK
        mine = [j * BLOCK + o for j in range(job.cache.hit_blocks) if hashes[j] in blocks.blocks for o in range(BLOCK)]
        mine += [cached + t for t in plan_pass(len(ids) - cached, world, BLOCK).rank_tokens(rank)]
        everyone = [None] * world
        dist.all_gather_object(everyone, (mine, result.blocks_used, len(blocks.blocks)))
        if rank == 0:
            index.commit(hashes, job.cache)
            rows = torch.cat([kv for _, kv in sorted(landed.pop(job.request_id), key=lambda x: x[0])], dim=2)
            kv = torch.empty_like(rows)
            kv[:, :, [p for positions, _, _ in everyone for p in positions]] = rows
            out.append(
                dict(
                    plan=job.cache,
                    logits=logits,
                    kv=kv,
                    used=[u for _, u, _ in everyone],
                    cached=[c for _, _, c in everyone],
                    held=list(index.held),
                )
            )
    blocks.clear()
    if rank == 0:
        receiver.close()
        index.clear()
    return out, cache.allocator.num_used


def check_warm_equals_cold(model, prompts, results, atol=1e-4):
    """Every prompt's logits and landed KV equal a cold single-process run; the cached part is
    bit-identical to the KV of the request that stored it; counters equal the cache's holdings."""
    stored: dict[bytes, torch.Tensor] = {}
    for ids, r in zip(prompts, results):
        ref_logits = run_chunks(model, ids, [len(ids)], block_size=BLOCK)[-1]
        torch.testing.assert_close(r["logits"], ref_logits, atol=atol, rtol=atol)
        assert r["logits"].argmax() == ref_logits.argmax()
        torch.testing.assert_close(r["kv"], single_process_kv(model, ids), atol=atol, rtol=atol)
        hashes = block_hashes(ids, BLOCK)
        for j in range(r["plan"].hit_blocks):
            assert torch.equal(r["kv"][:, :, j * BLOCK : (j + 1) * BLOCK], stored[hashes[j]]), f"cached block {j}"
        for j, _ in r["plan"].store:
            stored[hashes[j]] = r["kv"][:, :, j * BLOCK : (j + 1) * BLOCK]
        assert r["used"] == r["cached"] == r["held"], "blocks held beyond the cache after a job"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_warm_prefills_equal_cold(world):
    hf = tiny_hf(8, 2, False, seed=world)
    config = ModelConfig.from_hf(hf.config.to_dict())
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    model = Llama.from_state_dict(config, state)
    doc = tokens(61, world)
    answer = [int(run_chunks(model, doc, [len(doc)], block_size=BLOCK)[-1].argmax())] + tokens(5, 10)
    exact = tokens(48, 11)
    cases = [  # (prompt, cached blocks expected)
        (doc, 0),  # cold: keeps its 7 full blocks
        (doc, 7),  # the same prompt: 56 cached tokens, 5 computed
        (doc[:45] + tokens(20, 12), 5),  # a question about the first 45 tokens: a hit inside doc
        (doc[:45] + tokens(14, 13), 5),  # another question: diverges after the same shared prefix
        (doc + answer + tokens(12, 14), 7),  # turn 2: turn 1's prompt and answer, then more
        (exact, 0),  # six full blocks
        (exact, 5),  # again: the last block is computed, so its logits exist
    ]
    prompts = [ids for ids, _ in cases]
    results, cleared = values(run_ranks(world, serve_prompts, hf.config.to_dict(), state, prompts, 64))[0]
    assert [r["plan"].hit_blocks for r in results] == [hit for _, hit in cases]
    check_warm_equals_cold(model, prompts, results)
    assert cleared == 0, "blocks left after the cache was cleared"


def test_eviction_under_memory_pressure():
    """8 blocks per rank: the third prompt evicts the first's deepest block; the first, asked
    again, reuses what is left of it, and what it reads is not evicted although it is the oldest."""
    world = 2
    hf = tiny_hf(8, 2, False, seed=5)
    config = ModelConfig.from_hf(hf.config.to_dict())
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    model = Llama.from_state_dict(config, state)
    p1, p2, p3 = tokens(40, 20), tokens(40, 21), tokens(40, 22)  # 5 blocks: 3 on rank 0, 2 on rank 1
    prompts = [p1, p2, p3, p1]
    results, cleared = values(run_ranks(world, serve_prompts, hf.config.to_dict(), state, prompts, 8))[0]
    h1, h2 = block_hashes(p1, BLOCK), block_hashes(p2, BLOCK)
    plans = [r["plan"] for r in results]
    assert [p.evict for p in plans] == [(), (), (h1[4],), (h2[4],)]
    assert plans[3].hit_blocks == 4
    assert [r["held"] for r in results] == [[3, 2], [6, 4], [8, 6], [8, 6]]
    check_warm_equals_cold(model, prompts, results)
    assert cleared == 0
