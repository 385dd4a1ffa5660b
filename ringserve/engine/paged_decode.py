"""Decode attention over the paged KV cache: one new query per sequence, keys read where they lie.

``decode_attention`` returns the same (out, lse) as ``attend`` of each sequence's query over its
cached tokens, so KV-parallel decode can merge the partials of several ranks. Two paths:

- half-precision caches on a GPU: a Triton split-K ("flash-decoding") kernel that walks each
  sequence's block table and reads K and V in place, so a step costs one pass over the KV;
  gathering the blocks first (``KVCache.read``) would read and write every byte once more;
- everything else (CPU, float32): gather each sequence's blocks and call ``attend``.

The kernel also runs on CPU under ``TRITON_INTERPRET=1``, which is how the tests check it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringserve.engine.attention import attend, merge
from ringserve.engine.kernels import triton_runs_on, use_kernel
from ringserve.engine.kv_cache import KVCache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton take the gather path
    triton = None


@dataclass
class DecodeBatch:
    """Where a step's sequences' KV lies: block tables [B, max_blocks] int32 and token counts as a
    tensor on the cache's device (built once per step, used by every layer). ``lengths`` also as a
    list where the host knows them (the gather path needs them; a CUDA graph replay does not)."""

    tables: torch.Tensor
    lengths_t: torch.Tensor
    lengths: list[int] | None = None

    @classmethod
    def build(cls, tables: torch.Tensor, lengths: list[int]) -> DecodeBatch:
        return cls(tables, torch.tensor(lengths, dtype=torch.int32).to(tables.device), lengths)


def decode_attention(
    cache: KVCache, layer: int, q: torch.Tensor, batch: DecodeBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, D] (sequence b's one query) over the first lengths[b] cached tokens of block table
    row b. Returns out [B, H, D] and lse [B, H] float32; a sequence with no tokens here gets out 0
    and lse -inf."""
    if use_kernel(q):
        return paged_decode_kernel(q, cache.k[layer], cache.v[layer], batch.tables, batch.lengths_t)
    tables, lengths = batch.tables, batch.lengths
    outs, lses = [], []
    for b, n in enumerate(lengths):
        keys, values = cache.read(layer, tables[b], n)
        out, lse = attend(q[b : b + 1], keys, values, causal=False)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def paged_decode_kernel(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of ``decode_attention`` for one layer's cache [num_blocks, block_size, Hkv, D].

    Each program handles one (sequence, KV head, split of that sequence's tokens) and keeps the
    whole query group of that KV head (GQA: H / Hkv heads) in one tile, so K and V are read once
    for all of them. Splits give long sequences enough parallel programs; their partials merge by
    LSE. The launch depends only on the batch size (never on lengths, which stay on the device),
    so a CUDA graph can replay it as sequences grow.
    """
    bsz, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    if num_splits is None:
        num_splits = max(1, 1024 // (bsz * kv_heads))  # enough programs to fill a GPU (~1,000)
    out = torch.empty(bsz, heads, num_splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, heads, num_splits, dtype=torch.float32, device=q.device)
    _paged_decode[(bsz, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        tables,
        lengths,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        tables.stride(0),
        dim**-0.5,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot needs 16 rows
        BLOCK=block_size,
        DIM=dim,
    )
    parts = (out.view(bsz * heads, num_splits, dim), lse.view(bsz * heads, num_splits))
    merged, total = merge_partials(*parts, dtype=q.dtype)
    return merged.view(bsz, heads, dim), total.view(bsz, heads)


def merge_partials(
    out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge R partial attentions per row at once: out [N, R, D] (last dim contiguous, any other
    strides), lse [N, R] -> out [N, D] in ``dtype`` (summed in float32), lse [N] float32. The same
    result as folding ``merge`` over the R partials, in one kernel launch instead of a dozen per
    partial (on a GPU)."""
    n, parts, dim = out.shape
    if not triton_runs_on(out.device):
        merged, total = out[:, 0].float(), lse[:, 0]
        for r in range(1, parts):
            merged, total = merge(merged, total, out[:, r], lse[:, r])
        return merged.to(dtype), total
    merged = torch.empty(n, dim, dtype=dtype, device=out.device)
    total = torch.empty(n, dtype=torch.float32, device=out.device)
    _merge_partials[(n,)](
        out,
        lse,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        lse.stride(1),
        merged,
        total,
        parts,
        PARTS=triton.next_power_of_2(parts),
        DIM=dim,
    )
    return merged, total


if triton is not None:

    @triton.jit
    def _paged_decode(
        Q,
        K,
        V,
        Tables,
        Lengths,
        Out,
        Lse,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_tb,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
        DIM: tl.constexpr,
    ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        num_splits = tl.num_programs(2)
        length = tl.load(Lengths + b)
        per_split = tl.cdiv(tl.cdiv(length, num_splits), BLOCK) * BLOCK  # whole blocks per split
        start = split * per_split
        end = tl.minimum(start + per_split, length)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM)
        t = tl.arange(0, BLOCK)
        heads = kv_head * GROUP + g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUP, other=0.0)

        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
        for pos in range(start, end, BLOCK):  # splits start on block boundaries
            block = tl.load(Tables + b * stride_tb + pos // BLOCK).to(tl.int64)
            valid = pos + t < end
            offs = block * stride_kb + t[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
            k = tl.load(K + offs, mask=valid[:, None], other=0.0)
            v = tl.load(V + offs, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, BLOCK] float32
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # finite: every block here has a valid token
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new

        empty = denom == 0.0
        out = acc / tl.where(empty, 1.0, denom)[:, None]
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, denom)))
        row = (b * GROUP * tl.num_programs(1) + heads) * num_splits + split  # [B, H, splits] layout
        tl.store(Out + row[:, None] * DIM + d[None, :], out, mask=g[:, None] < GROUP)
        tl.store(Lse + row, lse, mask=g < GROUP)

    @triton.jit
    def _merge_partials(
        Out,
        Lse,
        stride_on,
        stride_or,
        stride_ln,
        stride_lr,
        Merged,
        Total,
        parts,
        PARTS: tl.constexpr,
        DIM: tl.constexpr,
    ):
        row = tl.program_id(0)
        r = tl.arange(0, PARTS)
        d = tl.arange(0, DIM)
        lse = tl.load(Lse + row * stride_ln + r * stride_lr, mask=r < parts, other=float("-inf"))
        m = tl.max(lse, 0)
        safe = tl.where(m == float("-inf"), 0.0, m)  # every partial empty: no -inf - -inf
        w = tl.exp(lse - safe)
        denom = tl.sum(w, 0)
        out = tl.load(Out + row * stride_on + r[:, None] * stride_or + d[None, :], mask=(r < parts)[:, None], other=0.0)
        acc = tl.sum(out * w[:, None], 0)
        empty = denom == 0.0
        tl.store(Merged + row * DIM + d, (acc / tl.where(empty, 1.0, denom)).to(Merged.dtype.element_ty))
        tl.store(Total + row, tl.where(empty, float("-inf"), safe + tl.log(tl.where(empty, 1.0, denom))))
