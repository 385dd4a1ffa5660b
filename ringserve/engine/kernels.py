"""Triton kernels for the small ops of a half-precision forward on a GPU: add + RMSNorm, RoPE, SiLU x
mul, and the KV store. Each replaces several PyTorch kernels (a decode step at batch 64 was bound
by ~1,250 small launches, docs/BENCHMARKS.md) and rounds to the model's dtype where the PyTorch
code it replaces does, so RoPE, the residual add and SiLU x mul give the same bits and RMSNorm
differs only by its sum's order (measured on an H200: docs/BENCHMARKS.md, session 6). The PyTorch
code stays the reference and the path of every other case (CPU, float32): ``use_kernel`` decides.
Row offsets are 64-bit: a 128K-token pass's gate/up rows span more than 2**31 elements.

The kernels also run on CPU under ``TRITON_INTERPRET=1`` (float16: the interpreter has no
bfloat16), which is how the tests check them.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton take the PyTorch path
    triton = None


def use_kernel(x: torch.Tensor) -> bool:
    """The Triton kernels run on GPUs (or the interpreter) for half-precision tensors."""
    return x.dtype in (torch.float16, torch.bfloat16) and triton_runs_on(x.device)


def triton_runs_on(device: torch.device) -> bool:
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return device.type == "cuda" or isinstance(_silu_mul, InterpretedFunction)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s) x weight, s) with s = x + residual (s = x when residual is None); x [T, N]."""
    rows, n = x.shape
    y = x.new_empty(rows, n)
    s = x if residual is None else x.new_empty(rows, n)
    if rows:
        r = x if residual is None else residual
        _add_rms_norm[(rows,)](
            x, r, weight, y, s, x.stride(0), r.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=8,
        )  # fmt: skip
    return y, s


def rope(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k rotated ([T, H, D], [T, Hkv, D], new tensors) and v (a view) from one projection
    [T, (H + 2 Hkv) D]; cos, sin [T, D] (the half-split layout of ``model.apply_rope``)."""
    t = qkv.shape[0]
    q = qkv.new_empty(t, heads, dim)
    k = qkv.new_empty(t, kv_heads, dim)
    if t:
        _rope[(t, heads + kv_heads)](
            qkv, cos, sin, q, k, qkv.stride(0), cos.stride(0), sin.stride(0),
            HEADS=heads, KV_HEADS=kv_heads, HALF=dim // 2, HALF_PAD=triton.next_power_of_2(dim // 2),
            enable_fp_fusion=False,  # a fused multiply-add would skip the rounding PyTorch does
        )  # fmt: skip
    v = qkv[:, (heads + kv_heads) * dim :].view(t, kv_heads, dim)
    return q, k, v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) x up for gate_up [T, 2I] (gate first): [T, I]."""
    t, two_i = gate_up.shape
    n = two_i // 2
    out = gate_up.new_empty(t, n)
    block = 1024
    if t:
        _silu_mul[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), n, BLOCK=block)
    return out


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Write K and V [T, Hkv, D] (any strides, last dim contiguous) at flat ``slots`` [T] of one
    layer's cache [blocks, block_size, Hkv, D] (contiguous), in one launch."""
    t, kv_heads, dim = k.shape
    if t:
        _store_kv[(t, kv_heads)](
            k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            KV_HEADS=kv_heads, DIM=dim, DIM_PAD=triton.next_power_of_2(dim),
        )  # fmt: skip


if triton is not None:

    @triton.jit
    def _add_rms_norm(X, R, W, Y, S, stride_x, stride_r, n, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements in long passes
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:  # the sum rounds to the model's dtype, as PyTorch's add does
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x + r).to(S.dtype.element_ty)
            tl.store(S + row * n + cols, x, mask=mask)
            x = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, 0) / n + eps)
        normed = (x * inv).to(Y.dtype.element_ty).to(tl.float32)  # RMSNorm rounds before the weight
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * n + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope(
        QKV, Cos, Sin, Q, K, stride_qkv, stride_cos, stride_sin,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)  # q heads, then k heads
        d = tl.arange(0, HALF_PAD)
        mask = d < HALF
        src = QKV + t * stride_qkv + head * 2 * HALF
        x1 = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + d, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(Cos + t * stride_cos + d, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(Cos + t * stride_cos + HALF + d, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(Sin + t * stride_sin + d, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(Sin + t * stride_sin + HALF + d, mask=mask, other=0.0).to(tl.float32)
        dt = Q.dtype.element_ty  # x * cos, rotated * sin and their sum each round, as in PyTorch
        o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
        if head < HEADS:
            dst = Q + (t * HEADS + head) * 2 * HALF
        else:
            dst = K + (t * KV_HEADS + head - HEADS) * 2 * HALF
        tl.store(dst + d, o1, mask=mask)
        tl.store(dst + HALF + d, o2, mask=mask)

    @triton.jit
    def _silu_mul(GU, Out, stride_gu, n, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)  # 128K rows x 2 x 14,336 is past 2**31
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(GU + t * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + t * stride_gu + n + cols, mask=mask, other=0.0).to(tl.float32)
        dt = Out.dtype.element_ty
        silu = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # F.silu rounds, then the product
        tl.store(Out + t * n + cols, (silu * u).to(dt), mask=mask)

    @triton.jit
    def _store_kv(
        K, V, KC, VC, Slots, stride_kt, stride_kh, stride_vt, stride_vh,
        KV_HEADS: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        d = tl.arange(0, DIM_PAD)
        mask = d < DIM
        slot = tl.load(Slots + t).to(tl.int64)
        dst = (slot * KV_HEADS + head) * DIM + d
        k = tl.load(K + t * stride_kt + head * stride_kh + d, mask=mask)
        v = tl.load(V + t * stride_vt + head * stride_vh + d, mask=mask)
        tl.store(KC + dst, k.to(KC.dtype.element_ty), mask=mask)
        tl.store(VC + dst, v.to(VC.dtype.element_ty), mask=mask)
