"""Paged KV cache: the block allocator, the chained block hashes, and slot addressing."""

import hashlib
import random
import struct

import pytest
import torch

from ringserve.engine.config import ModelConfig
from ringserve.engine.kv_cache import BlockAllocator, KVCache, as_runs, block_hashes, blocks_needed
from ringserve.errors import InvalidArgument, ResourceExhausted

# -- BlockAllocator --------------------------------------------------------------------------------


def test_allocate_and_free_counters():
    alloc = BlockAllocator(8)
    assert (alloc.num_free, alloc.num_used) == (8, 0)
    a = alloc.allocate(3)
    b = alloc.allocate(5)
    assert len(a) == 3 and len(b) == 5
    assert len(set(a) | set(b)) == 8 and set(a + b) == set(range(8))  # distinct ids, all of them
    assert (alloc.num_free, alloc.num_used) == (0, 8)
    alloc.free(a)
    assert (alloc.num_free, alloc.num_used) == (3, 5)
    again = alloc.allocate(3)
    assert set(again) == set(a)  # freed blocks are handed out again
    alloc.free(again + b)
    assert (alloc.num_free, alloc.num_used) == (8, 0)


def test_allocate_zero_blocks():
    alloc = BlockAllocator(2)
    assert alloc.allocate(0) == []
    assert alloc.num_used == 0


def test_allocate_is_all_or_none():
    alloc = BlockAllocator(4)
    held = alloc.allocate(3)
    with pytest.raises(ResourceExhausted) as e:
        alloc.allocate(2)
    # The message says what was asked, what is left, and what to do about it.
    msg = str(e.value)
    assert "2 blocks needed" in msg and "1 of 4 free" in msg and "retry" in msg
    assert (alloc.num_free, alloc.num_used) == (1, 3)  # nothing was taken by the failed call
    assert len(alloc.allocate(1)) == 1
    alloc.free(held)


def test_double_free_and_foreign_free_raise():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(ValueError, match="freed twice or never allocated"):
        alloc.free(blocks[:1])
    with pytest.raises(ValueError, match="block 3"):
        BlockAllocator(4).free([3])  # never allocated
    assert (alloc.num_free, alloc.num_used) == (4, 0)


@pytest.mark.parametrize("n", [0, -1])
def test_allocator_needs_blocks(n):
    with pytest.raises(InvalidArgument, match="num_blocks"):
        BlockAllocator(n)


def _pool_with_holes() -> tuple[BlockAllocator, list[int]]:
    """32 blocks, all used but for holes of one block at 1, 3, 5, 7 and runs 12..17 and 22..29."""
    alloc = BlockAllocator(32)
    singles = [alloc.allocate(1)[0] for _ in range(32)]
    holes = [1, 3, 5, 7, *range(12, 18), *range(22, 30)]
    alloc.free(holes)
    return alloc, [b for b in singles if b not in holes]


def test_allocate_takes_the_fewest_runs_there_are():
    alloc, _ = _pool_with_holes()
    assert alloc.free_runs() == [range(1, 2), range(3, 4), range(5, 6), range(7, 8), range(12, 18), range(22, 30)]
    # No run holds 14: the two longest whole (the lowest 14 free ids would be 6 runs).
    table = alloc.allocate(14)
    assert as_runs(table) == [range(22, 30), range(12, 18)]
    assert alloc.free_runs() == [range(1, 2), range(3, 4), range(5, 6), range(7, 8)]
    assert (alloc.num_free, alloc.num_used) == (4, 28)


def test_a_request_that_fits_a_run_takes_the_shortest_such_run():
    alloc, _ = _pool_with_holes()
    assert alloc.allocate(5) == list(range(12, 17))  # 12..17 (6) fits, 22..29 (8) stays whole
    assert alloc.allocate(1) == [1]  # a single block fills the smallest hole, lowest first
    assert alloc.allocate(1) == [3]
    assert alloc.allocate(8) == list(range(22, 30))


def test_freed_blocks_merge_into_maximal_runs():
    alloc = BlockAllocator(16)
    a, b, c = alloc.allocate(4), alloc.allocate(4), alloc.allocate(4)
    assert (a, b, c) == (list(range(4)), list(range(4, 8)), list(range(8, 12)))
    alloc.free(a)
    alloc.free(c)  # merges with the free tail 12..15
    assert alloc.free_runs() == [range(0, 4), range(8, 16)]
    alloc.free(b[::-1])  # any order; joins both neighbours
    assert alloc.free_runs() == [range(0, 16)]
    assert alloc.allocate(16) == list(range(16))


def test_a_seeded_churn_keeps_the_counters_and_runs_consistent():
    rng = random.Random(7)
    alloc = BlockAllocator(200)
    live: list[list[int]] = []
    for _ in range(2000):
        if live and (rng.random() < 0.4 or alloc.num_free < 20):
            alloc.free(live.pop(rng.randrange(len(live))))
        elif live and rng.random() < 0.5:
            live[rng.randrange(len(live))].extend(alloc.allocate(1))  # a decoding sequence grows
        else:
            live.append(alloc.allocate(rng.randint(1, 20)))
        used = [b for t in live for b in t]
        free = [b for r in alloc.free_runs() for b in r]
        assert (alloc.num_used, alloc.num_free) == (len(used), len(free))
        assert sorted(used + free) == list(range(200))  # every block exactly once
        runs = alloc.free_runs()
        assert all(x.stop < y.start for x, y in zip(runs, runs[1:]))  # maximal: no two touch
    for t in live:
        alloc.free(t)
    assert (alloc.num_used, alloc.num_free, alloc.free_runs()) == (0, 200, [range(200)])


def test_a_bad_free_frees_nothing():
    alloc = BlockAllocator(8)
    table = alloc.allocate(3)
    for bad in ([table[0], table[0]], [table[1], 7]):
        with pytest.raises(ValueError, match="freed twice or never allocated"):
            alloc.free(bad)
        assert (alloc.num_used, alloc.num_free) == (3, 5)
    alloc.free(table)
    assert alloc.free_runs() == [range(8)]


def test_as_runs():
    assert as_runs([]) == []
    assert as_runs([4, 5, 6, 1, 2, 9]) == [range(4, 7), range(1, 3), range(9, 10)]


def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# -- block_hashes ----------------------------------------------------------------------------------


def test_block_hashes_count_and_partial_block():
    ids = list(range(10))
    assert len(block_hashes(ids, block_size=4)) == 2  # the trailing 2 tokens make no hash
    assert block_hashes(ids[:3], block_size=4) == []
    assert block_hashes(ids[:8], block_size=4) == block_hashes(ids, block_size=4)


def test_block_hashes_equal_prefixes_equal_hashes():
    a = [7, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
    b = a[:8] + [99, 98, 97, 96]
    ha, hb = block_hashes(a, 4), block_hashes(b, 4)
    assert ha[:2] == hb[:2]
    assert ha[2] != hb[2]
    assert len(set(ha)) == 3  # distinct blocks hash differently


def test_block_hashes_are_chained():
    base = list(range(100, 116))  # 4 blocks of 4
    ref = block_hashes(base, 4)
    changed = list(base)
    changed[5] = 0  # inside block 1
    got = block_hashes(changed, 4)
    assert got[0] == ref[0]
    assert all(g != r for g, r in zip(got[1:], ref[1:], strict=True))  # block 1 and every later one
    # The same tokens after a different prefix hash differently: the hash covers the prefix.
    assert block_hashes(base[4:8], 4)[0] != ref[1]
    # A parent continues a chain: hashing the tail with the head's last hash gives the same hashes.
    assert block_hashes(base[8:], 4, parent=ref[1]) == ref[2:]


def test_block_hashes_known_value():
    """blake2b-128 over the previous hash and the little-endian uint32 ids: stable across processes
    and machines (the router and the workers must agree)."""
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    first = hashlib.blake2b(struct.pack("<4I", 1, 2, 3, 4), digest_size=16).digest()
    second = hashlib.blake2b(first + struct.pack("<4I", 5, 6, 7, 8), digest_size=16).digest()
    assert block_hashes(ids, block_size=4) == [first, second]
    assert first.hex() == "5c3887ef44b86da26265cb5c108a056b"


# -- KVCache ---------------------------------------------------------------------------------------

CONFIG = ModelConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
)


def test_slots_follow_the_block_table():
    cache = KVCache(CONFIG, num_blocks=8, block_size=4)
    table = [5, 2, 7]
    assert cache.slots(table, 0, 10).tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 28, 29]
    assert cache.slots(table, 3, 6).tolist() == [23, 8, 9]


def test_write_read_round_trip_across_blocks():
    cache = KVCache(CONFIG, num_blocks=8, block_size=4)
    cache.k.fill_(7.0)  # the cache starts uninitialized; a sentinel shows what writes touch
    cache.v.fill_(7.0)
    table = cache.allocator.allocate(3)[::-1]  # non-contiguous, out of order
    g = torch.Generator().manual_seed(0)
    k = torch.randn(11, 2, 4, generator=g)
    v = torch.randn(11, 2, 4, generator=g)
    # Written in two pieces (prefill, then a chunk that crosses a block boundary).
    for layer in range(2):
        cache.write(layer, cache.slots(table, 0, 3), k[:3] + layer, v[:3] - layer)
        cache.write(layer, cache.slots(table, 3, 11), k[3:] + layer, v[3:] - layer)
    for layer in range(2):
        got_k, got_v = cache.read(layer, table, 11)
        assert torch.equal(got_k, k + layer) and torch.equal(got_v, v - layer)
        part_k, _ = cache.read(layer, table, 6)  # a prefix reads only what it needs
        assert torch.equal(part_k, k[:6] + layer)
    # Another sequence's blocks are untouched, and so is the unused tail of the last block.
    other = cache.allocator.allocate(2)
    assert not set(other) & set(table)
    assert bool((cache.k[:, other] == 7.0).all()) and bool((cache.v[:, other] == 7.0).all())
    assert bool((cache.k[:, table[2], 3] == 7.0).all())  # position 11 was never written


def test_write_casts_to_cache_dtype():
    cache = KVCache(CONFIG, num_blocks=2, block_size=4, dtype=torch.bfloat16)
    k = torch.randn(3, 2, 4)
    cache.write(0, cache.slots([1], 0, 3), k, k)
    got_k, _ = cache.read(0, [1], 3)
    assert got_k.dtype == torch.bfloat16
    torch.testing.assert_close(got_k.float(), k, rtol=1e-2, atol=1e-2)
