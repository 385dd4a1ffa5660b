"""The one attention primitive: ``attend`` returns output and log-sum-exp; ``merge`` combines partials.

Everything in ringserve that attends (single-device prefill and decode, ring pass-KV, ring pass-Q,
KV-parallel decode) is built from these two functions. Shapes are token-major:

    q: [Tq, H, D]    k, v: [Tk, Hkv, D]    (H a multiple of Hkv: grouped-query attention)
    out: [Tq, H, D] in q's dtype           lse: [Tq, H] float32, natural log

``causal=True`` is bottom-right aligned: query i sees keys j <= i + (Tk - Tq), i.e. the queries
are the last Tq positions of the keys. Rows that see no key (Tk == 0, or Tq > Tk under causal)
get out = 0 and lse = -inf, and ``merge`` treats them as empty, so splitting the keys into any
number of pieces and merging gives the unsplit result.

A backend (``Backend``) is a kernel plus what it computes in one call. Every kernel does full
attention and square causal (Tq == Tk); a ``bottom_right`` kernel also does causal with Tq < Tk
(chunked prefill over a cached prefix), which ``attend`` otherwise splits into a full call over the
prefix and a square-causal one, merged. A ``packed`` kernel attends several sequences, each causal
over its own keys, in one call (``attend_packed``: a pass that packs requests); without one each
sequence is a call of its own. Both paths give the same result, and the CPU tests run both.
Backends: ``cpu_flash`` (CPU default: PyTorch's fused CPU kernel), ``torch`` (plain math, the
reference; bottom-right), ``flash_attn4`` (CUDA default where the flash-attn-4 package is
installed, ``ringserve[gpu]``: bottom-right and packed), ``cudnn`` (CUDA default otherwise),
``flash`` (PyTorch's flash op).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ringserve.errors import InvalidArgument

# cuDNN SDPA otherwise builds a new execution plan for every new sequence length (tenths of a
# second each); chunked and packed prefill passes see a new length almost every call. With this,
# PyTorch runs such shapes through cuDNN's ragged path with one plan. Read when attention first runs.
os.environ.setdefault("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "1")

# A kernel: (q [Tq,H,D], k [Tk,Hkv,D], v, causal, scale) -> (out, lse [Tq,H] fp32).
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]
# A packed kernel: (q [sum Tq,H,D], k [sum Tk,Hkv,D], v, q_lens, k_lens, scale) -> (out, lse), causal.
PackedKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...], float],
    tuple[torch.Tensor, torch.Tensor],
]


@dataclass(frozen=True)
class Backend:
    """An attention kernel and what it computes in one call (see the module docstring)."""

    kernel: Kernel
    bottom_right: bool = False  # causal with Tq < Tk (queries the last Tq keys) in one call
    packed: PackedKernel | None = None  # several sequences, each causal over its own keys, in one call


# Above this many score elements the CPU kernel works through the queries in slices.
_CPU_MAX_SCORES = 1 << 26


def _torch_kernel(q, k, v, causal, scale):
    """Plain PyTorch, fp32 scores, causal bottom-right aligned; GQA by grouping query heads, never by
    copying K and V."""
    tq, h, d = q.shape
    tk, hkv, _ = k.shape
    g = h // hkv
    offset = tk - tq  # causal: query i sees keys j <= i + offset
    if tq * tk * h > _CPU_MAX_SCORES and tq > 1:  # bound memory: slices of queries
        step = max(1, _CPU_MAX_SCORES // (tk * h))
        parts = []
        for i0 in range(0, tq, step):
            i1 = min(i0 + step, tq)
            end = i1 + offset if causal else tk  # rows i0:i1 see no key past it
            parts.append(_torch_kernel(q[i0:i1], k[:end], v[:end], causal, scale))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    qg = q.float().reshape(tq, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * tq, d)
    kf = k.float().transpose(0, 1)
    vf = v.float().transpose(0, 1)
    scores = torch.bmm(qg, kf.transpose(1, 2)).mul_(scale)  # [Hkv, G*Tq, Tk]
    if causal:
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril_(offset)
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


def _fa4_kernel(q, k, v, causal, scale):
    """flash-attn-4 (CuTe DSL): GQA as it is, causal bottom-right aligned. Its first call of a kernel
    variant compiles it (seconds); a service's calibration passes run every variant it uses."""
    from flash_attn.cute import flash_attn_func

    out, lse = flash_attn_func(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), softmax_scale=scale, causal=causal, return_lse=True
    )
    return out[0], lse[0].transpose(0, 1)


@functools.lru_cache(maxsize=256)
def _cu_seqlens(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as int32 on ``device``: built once per pass shape, not once per layer."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _fa4_packed(q, k, v, q_lens, k_lens, scale):
    """flash-attn-4's variable-length entry: every sequence causal over its own keys, one launch."""
    from flash_attn.cute import flash_attn_varlen_func

    out, lse = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=_cu_seqlens(q_lens, q.device),
        cu_seqlens_k=_cu_seqlens(k_lens, q.device),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(k_lens),
        softmax_scale=scale,
        causal=True,
        return_lse=True,
    )
    return out, lse.transpose(0, 1)


BACKENDS: dict[str, Backend] = {
    "torch": Backend(_torch_kernel, bottom_right=True),  # plain math in fp32: the reference, and float32 on GPUs
    "cpu_flash": Backend(_cpu_flash_kernel),
    "cudnn": Backend(_cudnn_kernel),
    "flash": Backend(_flash_kernel),
    "flash_attn4": Backend(_fa4_kernel, bottom_right=True, packed=_fa4_packed),
}

CPU_BACKENDS = ("cpu_flash", "torch")
_selected: dict[str, str] = {}  # device type -> backend name, chosen once


def choose_cuda_backend(capability: tuple[int, int], cudnn: bool, fa4: bool) -> str:
    """The CUDA default for a GPU of ``capability``: flash-attn-4 where it is installed (``fa4``) and
    the GPU is Hopper or newer (where it was measured, docs/BENCHMARKS.md), else cuDNN SDPA (Ampere
    and newer), else PyTorch's flash op."""
    if fa4 and capability >= (9, 0):
        return "flash_attn4"
    if cudnn and capability >= (8, 0):
        return "cudnn"
    return "flash"


def _fa4_installed() -> bool:
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        return False
    return True


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
            _selected[dev] = (
                choose_cuda_backend(
                    torch.cuda.get_device_capability(), torch.backends.cudnn.is_available(), _fa4_installed()
                )
                if dev == "cuda"
                else "cpu_flash"
            )
    return _selected[dev]


def _empty(q: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The result for queries that see no key: zero output, LSE -inf."""
    out = q.new_zeros(rows, *q.shape[1:])
    return out, torch.full((rows, q.shape[1]), float("-inf"), device=q.device, dtype=torch.float32)


def default_backend(q: torch.Tensor) -> Backend:
    """The backend that attends ``q``: its device's, but float32 on a GPU runs the plain kernel (the
    GPU kernels take only half precision)."""
    gpu_fp32 = q.device.type != "cpu" and q.dtype == torch.float32
    return BACKENDS["torch" if gpu_fp32 else backend_name(q.device)]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k, v with its log-sum-exp; see the module docstring for shapes and masks."""
    tq, h, d = q.shape
    tk = k.shape[0]
    if scale is None:
        scale = d**-0.5
    backend = backend or default_backend(q)
    kernel = backend.kernel
    if tq == 0 or tk == 0:
        return _empty(q, tq)
    if not causal or tq == 1:  # one query at the end of the keys sees them all
        return kernel(q, k, v, False, scale)
    if tq > tk:  # the first tq - tk queries see nothing
        out, lse = attend(q[tq - tk :], k, v, True, scale, backend)
        empty_out, empty_lse = _empty(q, tq - tk)
        return torch.cat([empty_out, out]), torch.cat([empty_lse, lse])
    if tq == tk or backend.bottom_right:
        return kernel(q, k, v, True, scale)
    # tq < tk: every query sees the prefix in full, and the last tq keys causally.
    split = tk - tq
    return merge(*kernel(q, k[:split], v[:split], False, scale), *kernel(q, k[split:], v[split:], True, scale))


def attend_packed(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    q_lens: Sequence[int],
    scale: float | None = None,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of several sequences packed in one batch: sequence i's ``q_lens[i]`` rows of
    ``q`` (in order) over ``keys[i]``, ``values[i]``, its queries the last of its keys. The same as
    ``attend`` of each sequence, concatenated; one kernel call where the backend packs."""
    backend = backend or default_backend(q)
    if len(keys) == 1:
        return attend(q, keys[0], values[0], True, scale, backend)
    k_lens = tuple(k.shape[0] for k in keys)
    if backend.packed is None or not all(0 < n <= m for n, m in zip(q_lens, k_lens)):
        parts = [attend(qs, k, v, True, scale, backend) for qs, k, v in zip(q.split(list(q_lens)), keys, values)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return backend.packed(q, torch.cat(list(keys)), torch.cat(list(values)), tuple(q_lens), k_lens, scale)


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
