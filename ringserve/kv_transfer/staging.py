"""Bounce buffers for head pieces: a head sub-range of paged KV rows packed so that it moves in
large pieces.

A head sub-range of a row is strided in the pool ([.., slot, head, dim]), so moved as it lies it
takes one NIXL descriptor per row, layer and K/V, and per-descriptor cost dominates (docs/
BENCHMARKS.md, "KV transfer"). One ``index_select`` per K and V packs a chunk of rows of those
heads as [K/V, layer, rows, heads, dim], which is a pool of one block of whole rows: the sender
WRITEs it into a destination that holds just those heads (``plan_descriptors`` coalesces it by
the destination's runs of blocks), or into the receiver's own buffer, which ``scatter``s it into
a sub-range of its heads (a Pull, kv_transfer/nixl.py).
"""

from __future__ import annotations

import dataclasses
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

    def capacity(self, heads: int) -> int:
        """How many packed rows of ``heads`` heads the buffer holds."""
        layers, _, _, _, dim = self.cache.k.shape
        row = 2 * layers * heads * dim * self.cache.k.element_size()
        if len(self.buffer) < row:
            raise InvalidArgument(f"the staging buffer ({len(self.buffer)} bytes) holds no row of {row} bytes")
        return len(self.buffer) // row

    def chunks(self, count: int, heads: range) -> Iterator[tuple[int, int]]:
        """(first row, rows) pieces of ``count`` rows of ``heads`` that each fit the buffer."""
        per_chunk = self.capacity(len(heads))
        for a in range(0, count, per_chunk):
            yield a, min(per_chunk, count - a)

    def packed(self, layout: PoolLayout, count: int, heads: int) -> tuple[torch.Tensor, PoolLayout]:
        """The buffer's first bytes as ``count`` rows of ``heads`` heads, [K/V, layer, rows, heads,
        dim], and the layout that addresses them (a pool of one block of ``count`` whole rows)."""
        layers, _, _, _, dim = self.cache.k.shape
        nbytes = 2 * layers * count * heads * dim * self.cache.k.element_size()
        rows = self.buffer[:nbytes].view(self.cache.k.dtype).view(2, layers, count, heads, dim)
        where = dict(k_addr=rows[0].data_ptr(), v_addr=rows[1].data_ptr(), num_blocks=1, block_size=count)
        return rows, dataclasses.replace(layout, **where, kv_heads=heads)

    def gather(
        self, layout: PoolLayout, block_table: Sequence[int], start: int, count: int, heads: range
    ) -> PoolLayout:
        """Copy heads ``heads`` of rows [start, start + count) of ``block_table`` into the buffer
        (one row gather per layer, K and V); returns the layout that addresses them there."""
        rows, packed = self.packed(layout, count, len(heads))
        slots = self.cache.slots(block_table, start, start + count)
        for pool, out in ((self.cache.k, rows[0]), (self.cache.v, rows[1])):
            for src, dst in zip(_words(_heads(pool, heads)), _words(out)):
                torch.index_select(src, 0, slots, out=dst)
        return packed

    def scatter(self, rows: torch.Tensor, block_table: Sequence[int], start: int, heads: range) -> None:
        """Store ``rows`` (from ``packed``) into heads ``heads`` of the cache's rows from position
        ``start`` of ``block_table`` (one row scatter per layer, K and V)."""
        slots = self.cache.slots(block_table, start, start + rows.shape[2])
        for pool, part in ((self.cache.k, rows[0]), (self.cache.v, rows[1])):
            for dst, src in zip(_words(_heads(pool, heads)), _words(part)):
                dst.index_copy_(0, slots, src)


def _heads(pool: torch.Tensor, heads: range) -> torch.Tensor:
    """[layers, slots, heads, dim]: those heads of every row of a pool, a view."""
    return pool.flatten(1, 2)[:, :, heads.start : heads.stop]


def _words(t: torch.Tensor) -> torch.Tensor:
    """[layers, rows, heads, dim] (the last two dims contiguous) as [layers, rows, words]: each row's
    heads as the widest integers that tile it, so that an indexed copy moves 8 bytes an element,
    not 2, and per layer gathers whole rows (on CPU 3-4x faster than one gather over all layers)."""
    flat = t.flatten(2)
    row_bytes, stride_bytes = flat.shape[2] * t.element_size(), flat.stride(1) * t.element_size()
    for word in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if row_bytes % word.itemsize == 0 and stride_bytes % word.itemsize == 0:
            return flat.view(word)
    raise AssertionError("unreachable: uint8 tiles every row")
