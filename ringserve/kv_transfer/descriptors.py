"""Descriptor math for NIXL: which byte ranges copy which KV rows from one paged pool to another."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ringserve.errors import InvalidArgument
from ringserve.kv_transfer.landing import PoolLayout


def _slot_runs(table: np.ndarray, block_size: int, start: int, breaks: np.ndarray) -> np.ndarray:
    """Slots of cache positions ``start + breaks`` (every break inside a block of ``table``)."""
    pos = start + breaks
    return table[pos // block_size] * block_size + pos % block_size


def check_heads(
    src: PoolLayout, src_heads: range | None, dst: PoolLayout, dst_heads: range | None
) -> tuple[range, range]:
    """The head ranges of a move (None: all of a side's heads); raises InvalidArgument unless the
    layouts are compatible and both ranges are as long and lie inside their pools' heads."""
    src.check_compatible(dst)
    src_heads = range(src.kv_heads) if src_heads is None else src_heads
    dst_heads = range(dst.kv_heads) if dst_heads is None else dst_heads
    for layout, heads in ((src, src_heads), (dst, dst_heads)):
        if not heads or heads.step != 1 or heads.start < 0 or heads.stop > layout.kv_heads:
            raise InvalidArgument(f"KV heads {heads} are not a range inside the pool's {layout.kv_heads} heads")
    if len(src_heads) != len(dst_heads):
        raise InvalidArgument(f"{len(src_heads)} source KV heads cannot fill {len(dst_heads)} destination heads")
    return src_heads, dst_heads


def plan_descriptors(
    src: PoolLayout,
    src_table: Sequence[int],
    src_start: int,
    dst: PoolLayout,
    dst_table: Sequence[int],
    dst_start: int,
    count: int,
    src_heads: range | None = None,
    dst_heads: range | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Local and remote descriptors (rows of ``addr, bytes, device``) that copy ``count`` rows.

    Source positions [src_start, src_start + count) of ``src_table`` go to destination positions
    [dst_start, ...) of ``dst_table``, in every layer, K and V; of the KV heads ``src_heads`` of
    each source row into ``dst_heads`` of each destination row (local head indices; None: all of
    them). Whole rows are cut wherever either side crosses a block boundary and consecutive pieces
    that are contiguous on both sides (blocks with consecutive ids) merge back into one
    descriptor, so a fresh, unfragmented pool moves each layer's K and V in one descriptor each.
    A head sub-range of a row is strided in the pool ([.., slot, head, dim]): one descriptor per
    row, layer and K/V (``NixlEndpoint.push`` gathers a strided source into a staging buffer first
    when the destination takes whole rows, kv_transfer/staging.py).
    """
    src_heads, dst_heads = check_heads(src, src_heads, dst, dst_heads)
    src_t = np.asarray(src_table, dtype=np.int64)
    dst_t = np.asarray(dst_table, dtype=np.int64)
    if len(src_heads) == src.kv_heads and len(dst_heads) == dst.kv_heads:
        s_off, d_off, nbytes = _whole_rows(src, src_t, src_start, dst, dst_t, dst_start, count)
    else:
        rows = np.arange(count)
        head_bytes = src.head_dim * getattr(torch, src.dtype).itemsize
        s_off = _slot_runs(src_t, src.block_size, src_start, rows) * src.row_bytes + src_heads.start * head_bytes
        d_off = _slot_runs(dst_t, dst.block_size, dst_start, rows) * dst.row_bytes + dst_heads.start * head_bytes
        nbytes = np.full(count, len(src_heads) * head_bytes, dtype=np.int64)
    return _descs(src, s_off, nbytes), _descs(dst, d_off, nbytes)


def _whole_rows(
    src: PoolLayout, src_t: np.ndarray, src_start: int, dst: PoolLayout, dst_t: np.ndarray, dst_start: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte offsets (source, destination) and lengths of the runs that copy ``count`` whole rows."""
    # Offsets (from the first row) where the source or the destination enters a new block.
    src_cuts = np.arange((-src_start) % src.block_size, count, src.block_size)
    dst_cuts = np.arange((-dst_start) % dst.block_size, count, dst.block_size)
    breaks = np.union1d(np.union1d(src_cuts, dst_cuts), [0])
    lengths = np.diff(np.append(breaks, count))
    s_slot = _slot_runs(src_t, src.block_size, src_start, breaks)
    d_slot = _slot_runs(dst_t, dst.block_size, dst_start, breaks)
    # A piece continues the previous one when both its slots follow on directly.
    follows = np.zeros(len(breaks), dtype=bool)
    follows[1:] = (s_slot[1:] == s_slot[:-1] + lengths[:-1]) & (d_slot[1:] == d_slot[:-1] + lengths[:-1])
    heads = np.flatnonzero(~follows)
    run_len = np.add.reduceat(lengths, heads)
    return s_slot[heads] * src.row_bytes, d_slot[heads] * dst.row_bytes, run_len * src.row_bytes


def _descs(layout: PoolLayout, offsets: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """Descriptors of byte ranges (``offsets``, ``nbytes``) of one row layout in every layer, K and V."""
    bases = np.array(
        [
            base + layer * layout.layer_stride
            for layer in range(layout.num_layers)
            for base in (layout.k_addr, layout.v_addr)
        ],
        dtype=np.uint64,
    )
    out = np.empty((len(bases) * len(offsets), 3), dtype=np.uint64)
    out[:, 0] = (bases[:, None] + offsets.astype(np.uint64)[None, :]).reshape(-1)
    out[:, 1] = np.tile(nbytes.astype(np.uint64), len(bases))
    out[:, 2] = layout.device_id
    return out
