"""The one attention primitive: ``attend`` returns output and log-sum-exp; ``merge`` combines partials.

Everything in ringserve that attends (single-device prefill and decode, ring pass-KV, ring pass-Q,
KV-parallel decode) is built from these two functions. Shapes are token-major:

    q: [Tq, H, D]    k, v: [Tk, Hkv, D]    (H a multiple of Hkv: grouped-query attention)
    out: [Tq, H, D] in q's dtype           lse: [Tq, H] float32, natural log

``causal=True`` is bottom-right aligned: query i sees keys j <= i + (Tk - Tq), i.e. the queries
are the last Tq positions of the keys. Rows that see no key (Tk == 0, or Tq > Tk under causal)
get out = 0 and lse = -inf, and ``merge`` treats them as empty, so splitting the keys into any
number of pieces and merging gives the unsplit result.

Backends compute only two cases, full and square-causal; ``attend`` reduces every other case to
those, so the CPU tests exercise the same decomposition the GPU kernels run under. Backends:
``cpu_flash`` (CPU default: PyTorch's fused CPU kernel), ``torch`` (plain math, the reference),
``cudnn`` (CUDA default), ``flash``, ``flash_attn``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ringserve.errors import InvalidArgument

# cuDNN SDPA otherwise builds a new execution plan for every new sequence length (tenths of a
# second each); chunked and packed prefill passes see a new length almost every call. With this,
# PyTorch runs such shapes through cuDNN's ragged path with one plan. Read when attention first runs.
os.environ.setdefault("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "1")

# A backend kernel: (q [Tq,H,D], k [Tk,Hkv,D], v, causal_square, scale) -> (out, lse [Tq,H] fp32).
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]

# Above this many score elements the CPU kernel works through the queries in slices.
_CPU_MAX_SCORES = 1 << 26


def _torch_kernel(q, k, v, causal, scale):
    """Plain PyTorch, fp32 scores; GQA by grouping query heads, never by copying K and V."""
    tq, h, d = q.shape
    tk, hkv, _ = k.shape
    g = h // hkv
    if tq * tk * h > _CPU_MAX_SCORES and tq > 1:  # bound memory: slices of queries
        step = max(1, _CPU_MAX_SCORES // (tk * h))
        parts = []
        for i0 in range(0, tq, step):
            i1 = min(i0 + step, tq)
            if causal:  # rows i0:i1 of a square-causal attention see keys [0, i1)
                parts.append(attend(q[i0:i1], k[:i1], v[:i1], True, scale, _torch_kernel))
            else:
                parts.append(_torch_kernel(q[i0:i1], k, v, False, scale))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    qg = q.float().reshape(tq, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * tq, d)
    kf = k.float().transpose(0, 1)
    vf = v.float().transpose(0, 1)
    scores = torch.bmm(qg, kf.transpose(1, 2)).mul_(scale)  # [Hkv, G*Tq, Tk]
    if causal:
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril_()
        scores = scores.view(hkv, g, tq, tk).masked_fill_(~keep, float("-inf")).view(hkv, g * tq, tk)
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G*Tq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.bmm(probs, vf)  # [Hkv, G*Tq, D]
    out = out.view(hkv, g, tq, d).permute(2, 0, 1, 3).reshape(tq, h, d)
    lse = lse.view(hkv, g, tq).permute(2, 0, 1).reshape(tq, h)
    return out.to(q.dtype), lse


def _cpu_flash_kernel(q, k, v, causal, scale):
    """PyTorch's fused CPU attention (it returns the LSE too) for prefill; one query (decode) is
    faster through the plain kernel, which also bounds memory the same way."""
    if q.shape[0] == 1:
        return _torch_kernel(q, k, v, causal, scale)
    k, v = _expand_kv(q, k, v)
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, T, D]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, 0.0, causal, scale=scale)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1).float()


def _expand_kv(q, k, v):
    """Repeat KV heads for kernels that need H == Hkv."""
    g = q.shape[1] // k.shape[1]
    if g == 1:
        return k, v
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def _cudnn_kernel(q, k, v, causal, scale):
    """cuDNN SDPA with LSE: the fastest measured on Hopper (docs/BENCHMARKS.md). It takes grouped
    KV heads as they are (no copy), at the same speed as expanded ones."""
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, T, D]
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, causal, False, scale=scale)
    return res[0][0].transpose(0, 1), res[1][0, :, :, 0].transpose(0, 1).float()


def _flash_kernel(q, k, v, causal, scale):
    """PyTorch's built-in flash attention op: the fallback where cuDNN SDPA is missing."""
    k, v = _expand_kv(q, k, v)
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    res = torch.ops.aten._scaled_dot_product_flash_attention(qb, kb, vb, 0.0, causal, False, scale=scale)
    return res[0][0].transpose(0, 1), res[1][0].transpose(0, 1).float()


def _flash_attn_kernel(q, k, v, causal, scale):
    """The flash-attn package (handles GQA natively), used when it is installed."""
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(
        q.unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        softmax_scale=scale,
        causal=causal,
        return_attn_probs=True,
    )
    return out[0], lse[0].transpose(0, 1).float()


BACKENDS: dict[str, Kernel] = {
    "torch": _torch_kernel,  # plain math in fp32: the reference, and float32 on GPUs
    "cpu_flash": _cpu_flash_kernel,
    "cudnn": _cudnn_kernel,
    "flash": _flash_kernel,
    "flash_attn": _flash_attn_kernel,
}

CPU_BACKENDS = ("cpu_flash", "torch")
_selected: dict[str, str] = {}  # device type -> backend name, chosen once


def _capable_cuda_backend() -> str:
    try:
        import flash_attn  # noqa: F401

        return "flash_attn"
    except ImportError:
        pass
    if torch.backends.cudnn.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        return "cudnn"
    return "flash"


def set_backend(name: str | None, device_type: str = "cuda") -> None:
    """Force a backend for a device type (config or ``RINGSERVE_ATTENTION_BACKEND``); None re-selects."""
    if name is None:
        _selected.pop(device_type, None)
        return
    if name not in BACKENDS:
        raise InvalidArgument(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    if device_type == "cpu" and name not in CPU_BACKENDS:
        raise InvalidArgument(f"attention backend {name!r} needs a GPU; on CPU choose one of {CPU_BACKENDS}")
    _selected[device_type] = name


def backend_name(device: torch.device) -> str:
    """The backend used on this device type: forced, or chosen once by capability."""
    dev = device.type
    if dev not in _selected:
        forced = os.environ.get("RINGSERVE_ATTENTION_BACKEND")
        if forced and (dev == "cuda" or forced in CPU_BACKENDS):
            set_backend(forced, dev)
        else:
            _selected[dev] = _capable_cuda_backend() if dev == "cuda" else "cpu_flash"
    return _selected[dev]


def _empty(q: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The result for queries that see no key: zero output, LSE -inf."""
    out = q.new_zeros(rows, *q.shape[1:])
    return out, torch.full((rows, q.shape[1]), float("-inf"), device=q.device, dtype=torch.float32)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    kernel: Kernel | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k, v with its log-sum-exp; see the module docstring for shapes and masks."""
    tq, h, d = q.shape
    tk = k.shape[0]
    if scale is None:
        scale = d**-0.5
    if kernel is None:
        # The GPU kernels take only half precision; float32 on a GPU runs the plain kernel.
        gpu_fp32 = q.device.type != "cpu" and q.dtype == torch.float32
        kernel = BACKENDS["torch" if gpu_fp32 else backend_name(q.device)]
    if tq == 0 or tk == 0:
        return _empty(q, tq)
    if not causal or tq == 1:  # one query at the end of the keys sees them all
        return kernel(q, k, v, False, scale)
    if tq > tk:  # the first tq - tk queries see nothing
        out, lse = attend(q[tq - tk :], k, v, True, scale, kernel)
        empty_out, empty_lse = _empty(q, tq - tk)
        return torch.cat([empty_out, out]), torch.cat([empty_lse, lse])
    if tq == tk:
        return kernel(q, k, v, True, scale)
    # tq < tk: every query sees the prefix in full, and the last tq keys causally.
    split = tk - tq
    return merge(*kernel(q, k[:split], v[:split], False, scale), *kernel(q, k[split:], v[split:], True, scale))


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint keys; exact, and safe when an LSE is -inf.

    Computes in float32 and returns ``out_a``'s dtype, so callers that loop (rings) keep an
    float32 accumulator by passing one in.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # both empty: no -inf - -inf
    out = out_a.float() * torch.exp(lse_a - safe).unsqueeze(-1)
    out += out_b.float() * torch.exp(lse_b - safe).unsqueeze(-1)
    return out.to(out_a.dtype), lse
