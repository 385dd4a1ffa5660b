"""A sender's bounce buffer: a head sub-range of paged KV rows gathered so that it moves as whole rows.

A head sub-range of a row is strided in the pool ([.., slot, head, dim]), so written as it lies it
takes one NIXL descriptor per row, layer and K/V, and per-descriptor cost dominates (docs/
BENCHMARKS.md, "KV transfer"). When the destination holds exactly the heads that move (a decode
rank of higher TP than the prefill rank), one gather per K and V (``index_select`` into the
buffer) packs them as [K/V, layer, rows, heads, dim], which is a pool of one block of whole rows:
``plan_descriptors`` then coalesces them by the destination's runs of blocks, as for a TP 1 move.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ringserve.engine.kv_cache import KVCache
from ringserve.errors import InvalidArgument
from ringserve.kv_transfer.landing import PoolLayout

DEFAULT_STAGING_BYTES = 256 << 20  # per endpoint; a longer move goes in chunks of this size


class Staging:
    """A byte buffer beside a cache (same device), which a NIXL agent registers once."""

    def __init__(self, cache: KVCache, nbytes: int):
        self.cache = cache
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=cache.k.device)

    def chunks(self, count: int, heads: range) -> Iterator[tuple[int, int]]:
        """(first row, rows) pieces of ``count`` rows of ``heads`` that each fit the buffer."""
        layers, _, _, _, dim = self.cache.k.shape
        row = 2 * layers * len(heads) * dim * self.cache.k.element_size()
        per_chunk = len(self.buffer) // row
        if per_chunk < 1:
            raise InvalidArgument(f"the staging buffer ({len(self.buffer)} bytes) holds no row of {row} bytes")
        for a in range(0, count, per_chunk):
            yield a, min(per_chunk, count - a)

    def gather(
        self, layout: PoolLayout, block_table: Sequence[int], start: int, count: int, heads: range
    ) -> PoolLayout:
        """Copy heads ``heads`` of rows [start, start + count) of ``block_table`` into the buffer;
        returns the layout that addresses them there (one block of ``count`` whole rows)."""
        cache = self.cache
        layers, _, _, _, dim = cache.k.shape
        elems = layers * count * len(heads) * dim
        packed = (
            self.buffer[: 2 * elems * cache.k.element_size()]
            .view(cache.k.dtype)
            .view(2, layers, count, len(heads), dim)
        )
        slots = cache.slots(block_table, start, start + count)
        for pool, out in ((cache.k, packed[0]), (cache.v, packed[1])):
            torch.index_select(pool.flatten(1, 2)[:, :, heads.start : heads.stop], 1, slots, out=out)
        return PoolLayout(
            mem=layout.mem,
            device_id=layout.device_id,
            k_addr=packed[0].data_ptr(),
            v_addr=packed[1].data_ptr(),
            num_layers=layers,
            num_blocks=1,
            block_size=count,
            kv_heads=len(heads),
            head_dim=dim,
            dtype=layout.dtype,
        )
