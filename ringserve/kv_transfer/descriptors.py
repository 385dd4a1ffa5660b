"""Descriptor math for NIXL: which byte ranges copy which KV rows from one paged pool to another."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ringserve.kv_transfer.landing import PoolLayout


def _slot_runs(table: np.ndarray, block_size: int, start: int, breaks: np.ndarray) -> np.ndarray:
    """Slots of cache positions ``start + breaks`` (every break inside a block of ``table``)."""
    pos = start + breaks
    return table[pos // block_size] * block_size + pos % block_size


def plan_descriptors(
    src: PoolLayout,
    src_table: Sequence[int],
    src_start: int,
    dst: PoolLayout,
    dst_table: Sequence[int],
    dst_start: int,
    count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Local and remote descriptors (rows of ``addr, bytes, device``) that copy ``count`` rows.

    Source positions [src_start, src_start + count) of ``src_table`` go to destination positions
    [dst_start, ...) of ``dst_table``, in every layer, K and V. The rows are cut wherever either
    side crosses a block boundary; consecutive pieces that are contiguous on both sides (blocks
    with consecutive ids) merge back into one descriptor, so a fresh, unfragmented pool moves
    each layer's K and V in one descriptor each.
    """
    src.check_compatible(dst)
    row = src.row_bytes
    src_t = np.asarray(src_table, dtype=np.int64)
    dst_t = np.asarray(dst_table, dtype=np.int64)
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
    nbytes = run_len * row

    def descs(layout: PoolLayout, offsets: np.ndarray) -> np.ndarray:
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

    return descs(src, s_slot[heads] * row), descs(dst, d_slot[heads] * row)
