"""The prefill tier's prefix cache: the leader's decisions (no processes; the group runs them in
test_prefill_group.py)."""

import random
from typing import NamedTuple

import pytest

from ringserve.engine.kv_cache import block_hashes
from ringserve.errors import ResourceExhausted
from ringserve.prefill_service.prefix_cache import PrefixIndex
from ringserve.prefill_service.sharding import chunk_blocks, plan_pass

BLOCK = 8


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(97) for _ in range(n)]


class Plan(NamedTuple):
    hit_blocks: int
    evict: tuple[bytes, ...]  # at the start (to fit) and at the end (capacity), in order
    store: tuple[tuple[int, int], ...]  # (prompt block, rank)


def run_index(index: PrefixIndex, ids: list[int], chunks: list[int] | None = None) -> tuple[Plan, list[bytes]]:
    """Start and finish one prompt as the leader does around a request, computed in one pass or
    in ``chunks`` (token counts after the cached prefix)."""
    bs, world = index.block_size, index.world
    hashes = block_hashes(ids, bs)
    start = index.start(hashes, len(ids))
    assert start is not None
    owners, at = {}, len(start.hit) * bs
    for n in chunks or [len(ids) - at]:
        for r in range(world):
            owners.update((j, r) for j in chunk_blocks(plan_pass(n, world, bs), at, r, bs))
        at += n
    assert at == len(ids)
    store = index.finish(hashes, start, owners, keep=True)
    assert index.reserved == [0] * world and not index.pins
    return Plan(len(start.hit), index.take_evictions(), tuple((j, r) for j, r, _ in store)), hashes


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
    a long next turn does not fit next to that prefix, so it runs cold, evicting the prefix's
    leaves to fit, and keeps its own blocks (all but block 0, which is still cached)."""
    index = PrefixIndex(world=2, kv_blocks=6, capacity=6, block_size=4)
    base = tokens(100, 6)
    for turn in range(4):
        plan, _ = run_index(index, base[: 4 * turn + 5])
        assert plan.hit_blocks == turn
    assert index.held == [0, 4]
    plan, hashes = run_index(index, base[:16] + tokens(24, 7))
    assert plan.hit_blocks == 0
    assert plan.evict == (hashes[3], hashes[2], hashes[1])
    assert [j for j, _ in plan.store] == list(range(1, 10))
    assert index.held == [4, 6]
    assert_prefix_closed(index, [base[:16] + tokens(24, 7)])


def test_prompt_too_long_for_the_group_is_resource_exhausted():
    index = PrefixIndex(world=2, kv_blocks=4, capacity=4, block_size=4)
    with pytest.raises(ResourceExhausted, match="needs 5 KV blocks on one rank.*has 4"):
        index.check_fits(40)
    index.check_fits(32)


def test_requests_in_flight_pin_and_reserve():
    """Two requests at once: the second waits (None) while the first holds the memory, and the
    blocks the first reads cannot be evicted for anyone until it finishes."""
    index = PrefixIndex(world=2, kv_blocks=6, capacity=6, block_size=4)
    a = tokens(24, 30)
    run_index(index, a)  # 6 blocks cached, 3 per rank
    reader = a[:16] + tokens(4, 31)  # reads 4 cached blocks, computes 1 new one
    hr = block_hashes(reader, 4)
    start = index.start(hr, len(reader))
    assert len(start.hit) == 4 and index.pins == {h: 1 for h in hr[:4]}
    assert index.reserved == [1, 0] and index.take_evictions() == ()  # it fits next to a: nothing evicted
    big = tokens(40, 32)  # 5 blocks per rank: only fits by evicting pinned blocks, so it waits
    assert index.start(block_hashes(big, 4), 40) is None
    index.finish(hr, start, {4: 0}, keep=False)  # cancelled: nothing stored
    assert index.reserved == [0, 0] and not index.pins
    assert index.start(block_hashes(big, 4), 40) is not None  # now evicting a's blocks makes room


def test_chunked_prompt_stores_blocks_where_its_chunks_put_them():
    """Chunks of whole (block x ranks) units give each rank the same number of blocks as one
    pass, but different ones; the store records the chunked owners."""
    index = PrefixIndex(world=2, kv_blocks=16, capacity=16, block_size=4)
    ids = tokens(40, 40)  # 10 blocks
    one, _ = run_index(index, ids)
    index.clear()
    chunked, _ = run_index(index, ids, [16, 8, 16])
    assert sorted(one.store) != sorted(chunked.store)
    per_rank = [[sum(r == k for _, r in plan.store) for k in range(2)] for plan in (one, chunked)]
    assert per_rank[0] == per_rank[1] == [5, 5]
    # Chunk 1 (blocks 0-3): rank 0 holds blocks 0 and 3, rank 1 blocks 1 and 2.
    assert dict(chunked.store)[0] == 0 and dict(chunked.store)[1] == 1 and dict(chunked.store)[3] == 0
