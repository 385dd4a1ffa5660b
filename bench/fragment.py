"""A pool after hours of mixed traffic, in a second: the block table a long request gets then.

The KV transfer benchmarks (bench/kv_transfer_gpu.py, bench/kv_transfer_cpu.py) and tests share it.
"""

from __future__ import annotations

import random

from ringserve.engine.kv_cache import BlockAllocator


def mixed_load_table(num_blocks: int, request_blocks: int, seed: int, steps: int = 400) -> list[int]:
    """A request's block table after a seeded mixed load on a pool of ``num_blocks``.

    Each step every running request finishes (5%) or grows by a block as it decodes (20%), and
    new requests are admitted while they fit (90% of 1-32 blocks, the rest 1/64-1/8 of the pool),
    so the pool runs nearly full and its free blocks end up in holes of all sizes. Then the long
    request waits for room as a scheduler would: running requests finish, in a seeded order,
    until ``request_blocks`` are free, and it takes them from the allocator.
    """
    rng = random.Random(seed)
    alloc = BlockAllocator(num_blocks)
    live: list[list[int]] = []

    def size() -> int:
        return rng.randint(1, 32) if rng.random() < 0.9 else rng.randint(num_blocks // 64, num_blocks // 8)

    pending = size()
    for _ in range(steps):
        for req in list(live):
            if rng.random() < 0.05:
                live.remove(req)
                alloc.free(req)
            elif rng.random() < 0.2 and alloc.num_free:
                req.extend(alloc.allocate(1))
        while pending <= alloc.num_free - 8:
            live.append(alloc.allocate(pending))
            pending = size()
    while alloc.num_free < request_blocks:
        alloc.free(live.pop(rng.randrange(len(live))))
    return alloc.allocate(request_blocks)
