"""Check and time ringserve's context-parallel prefill on GPUs: one script for the GPU box.

    torchrun --nproc-per-node 2 bench/cp_gpu.py --out $OUT/cp.json      # two GPUs
    torchrun --nproc-per-node 1 bench/cp_gpu.py --out $OUT/cp.json      # one GPU: CP-2 rows skipped
    torchrun --nproc-per-node 2 bench/cp_gpu.py --device cpu --tiny --out /tmp/cp.json   # CPU, gloo

Sections (``--sections``, default all, in this order):

check      Correctness before timing. ``attend`` with the selected backend (on GPU also PyTorch's
           flash op, and the cuDNN kernel without ringserve's GQA expansion of K/V, a proposed
           patch) on bf16 and fp32 inputs, GQA, several (Tq, Tk) incl. causal Tq < Tk and
           Tq > Tk, against the plain-PyTorch kernel in fp32: max |error| of out and LSE. Then
           ring pass-KV and pass-Q over the whole group against single-device attention on a
           case with a cached prefix split unevenly over the ranks. A mismatch is marked loudly
           (``*** MISMATCH``) but timing goes on.
attention  Causal full-prefill attention (bf16, 32 query heads, 8 KV heads, d=128) at 32K,
           128K and 512K tokens: (a) the bare cuDNN SDPA op with KV expanded to 32 heads before
           timing, the same op given the 8 KV heads as they are, and SDPA with ``enable_gqa=True``
           forced onto cuDNN; (b) ringserve on one GPU (``attend``, ``attend`` with the proposed
           kernel, and ``ring_pass_kv`` with a world of 1); (c) ringserve CP over all
           GPUs, pass-KV and pass-Q, each rank holding its load-balanced shard; (d) PyTorch's
           experimental ``context_parallel`` (cuDNN, else flash; MHA-expanded KV; head-tail
           load balancing; all-gather and all-to-all rotation), cross-checked against (c).
missrate   Pass-KV vs pass-Q at P+T = 128K for miss rates T/(T+P) of 1%..100% (P cached tokens
           split evenly over the ranks, T new ones sharded by ``plan_pass``), one layer's
           attention; and what ``choose_strategy("auto")`` picks with ``measure_rates``.
model      Time to first token of ``CPRunner.prefill`` on a Llama-3-8B-shaped model with random
           bf16 weights at 32K and 128K tokens, on one GPU and on all GPUs, beside Hugging Face's
           ``LlamaForCausalLM`` (sdpa, ``logits_to_keep=1``, no cache) on the same weights.

FLOP counts (forward only; a multiply-add is 2 FLOPs; H query heads, D head dim, L layers):
    causal attention over T tokens        2 * T^2 * H * D      (half of full attention's 4 T^2 H D)
    T new tokens over P cached ones       2 * T^2 * H * D + 4 * T * P * H * D
    model, one prefill of T tokens        2 * N * T + L * 2 * T^2 * H * D + 2 * hidden * vocab
        N = parameters excluding the embedding and lm_head (linear layers and norms); the last
        term is lm_head on the one token that is sampled.
TF/s per GPU = FLOPs / time / GPUs. Times: warm-up calls, a barrier, then a fixed number of calls
(the same on every rank, derived from the FLOP count) between CUDA events; a multi-GPU time is
the slowest rank's. One-GPU rows run on rank 0 while the other ranks wait at a barrier.

Everything goes to ``--out`` (JSON, rewritten after each section); progress goes to stderr and
one table per section to stdout. ``--sizes`` overrides token counts, e.g. ``--sizes 32K,128K``
(attention and model) or ``--sizes attention=512K --sizes missrate=64K --sizes model=32K``.
"""

from __future__ import annotations

import os
import time

START = time.perf_counter()  # the watchdog counts from here, imports included

# Required on the H200 host (NVLink SHARP / multicast must stay off); set before torch loads NCCL.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ringserve.engine import attention  # noqa: E402
from ringserve.engine.config import ModelConfig  # noqa: E402
from ringserve.engine.kv_cache import KVCache, blocks_needed  # noqa: E402
from ringserve.engine.model import Llama  # noqa: E402
from ringserve.prefill_service.context_parallel import CPRunner, CPSequence  # noqa: E402
from ringserve.prefill_service.ring import RingComm, RingLayout, ring_pass_kv, ring_pass_q  # noqa: E402
from ringserve.prefill_service.sharding import PassPlan, plan_pass  # noqa: E402
from ringserve.prefill_service.strategy import choose_strategy, measure_rates  # noqa: E402
from ringserve.process_group import init_group  # noqa: E402

K = 1024
BLOCK = 64
SECTIONS = ("check", "attention", "missrate", "model")
MISS_RATES = (0.01, 0.025, 0.05, 0.10, 0.20, 0.50, 1.00)

# Shapes and token counts: the real ones for the GPU box, tiny ones so every path runs on CPU.
FULL = dict(
    heads=32,
    kv_heads=8,
    head_dim=128,
    check=4 * K,
    attention=[32 * K, 128 * K, 512 * K],
    missrate=[128 * K],
    model=[32 * K, 128 * K],
    llama=dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
)
TINY = dict(
    heads=4,
    kv_heads=2,
    head_dim=32,
    check=1 * K,
    attention=[512, 1 * K, 2 * K],
    missrate=[2 * K],
    model=[512, 1 * K],
    llama=dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
)


@dataclass
class Ctx:
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    solo: object  # process group of rank 0 alone, for one-GPU runs (None when the world is 1)
    cfg: dict
    results: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    section: str = "startup"
    t0: float = START

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def unit(self) -> str:
        return "GPU" if self.cuda else "rank"


# ----------------------------------------------------------------------------- helpers


def log(ctx: Ctx, msg: str, everyone: bool = False) -> None:
    if ctx.leader or everyone:
        print(f"[cp_gpu r{ctx.rank} {time.perf_counter() - ctx.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


def free_memory(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def slowest(ctx: Ctx, x: float) -> float:
    """The maximum of ``x`` over all ranks."""
    t = torch.tensor([x], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


def everyone_ok(ctx: Ctx, ok: bool) -> bool:
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t[0])


def agree(ctx: Ctx, err: str | None) -> str | None:
    """Every rank's error, joined (None if no rank failed): all ranks then take the same path."""
    errs: list = [None] * ctx.world
    dist.all_gather_object(errs, err)
    bad = [f"r{r}: {e}" for r, e in enumerate(errs) if e]
    return "; ".join(bad) if bad else None


def attempt(ctx: Ctx, fn):
    """(fn(), None), or (None, "Type: message") if it raised (out of memory included)."""
    try:
        return fn(), None
    except Exception as e:  # reported in the tables, never fatal
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
        log(ctx, f"error in {ctx.section}: {msg}", everyone=True)
        if ctx.args.verbose:
            traceback.print_exc(file=sys.stderr)
        free_memory(ctx)
        return None, msg


def leader_only(ctx: Ctx, fn):
    """Run ``fn`` on rank 0 (the one-GPU measurements) while the other ranks wait at a barrier.

    Returns fn's value on rank 0 and None elsewhere; an error is reported, never raised, so the
    ranks stay in step.
    """
    value = None
    if ctx.leader:
        value, err = attempt(ctx, fn)
        if err:
            problem(ctx, f"{ctx.section} (rank 0 alone) failed: {err}", mismatch=False)
    dist.barrier()
    return value


def counts(ctx: Ctx, flops_per_gpu: float, target_s: float = 1.0, min_iters: int = 2) -> tuple[int, int]:
    """(warm-up, timed) call counts: a function of the FLOPs only, hence the same on every rank."""
    if not ctx.cuda:
        return 1, 2
    est = flops_per_gpu / 4e14  # ~400 TF/s: a rough guess is enough to size the loop
    iters = int(min(20, max(min_iters, round(target_s / est))))
    return (1 if est > 0.25 else 2), iters


def bench(ctx: Ctx, fn, warmup: int, iters: int, collective: bool) -> float:
    """Seconds per call of ``fn``. ``collective``: every rank runs it; returns the slowest rank's."""
    for _ in range(warmup):
        fn()
    sync(ctx)
    if collective:
        dist.barrier()
    if ctx.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        seconds = (time.perf_counter() - t0) / iters
    return slowest(ctx, seconds) if collective else seconds


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp32; equal infinities (empty rows' LSE) count as 0, NaN as inf."""
    if a.numel() == 0:
        return 0.0
    a, b = a.float(), b.float()
    d = torch.where(a == b, torch.zeros_like(a), (a - b).abs())
    return float(d.nan_to_num(nan=math.inf).max())


def randn(gen: torch.Generator, shape, ctx: Ctx, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=gen.device, dtype=torch.float32).to(ctx.device, dtype)


def rank_index(plan: PassPlan, rank: int, device) -> torch.Tensor:
    """Token indices (within the pass) this rank holds, built on the device."""
    parts = [torch.arange(*plan.pieces[p], device=device) for p in plan.rank_pieces(rank)]
    return torch.cat(parts)


def to_bhsd(x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """[T, h, D] -> contiguous [1, heads, T, D], repeating KV heads up to ``heads``."""
    x = x.transpose(0, 1)
    if heads is not None and heads != x.shape[0]:
        x = x.repeat_interleave(heads // x.shape[0], dim=0)
    return x.unsqueeze(0).contiguous()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def peak_gib(ctx: Ctx) -> float | None:
    return torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None


def reset_peak(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)


def tokens_str(n: int) -> str:
    return f"{n // K}K" if n % K == 0 and n >= K else str(n)


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        if abs(x) >= 1e-3:
            return f"{x:.4f}"
        return f"{x:.1e}"
    return str(x)


def table(ctx: Ctx, title: str, headers: list[str], rows: list[list]) -> None:
    """Print an aligned table to stdout (rank 0); the last column is cut to 100 characters."""
    if not ctx.leader:
        return
    cells = [[fmt(c) for c in r] for r in rows]
    for r in cells:
        r[-1] = r[-1][:100]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [f"\n== {title} ==", "  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    print("\n".join(lines), flush=True)


def clean(x):
    """JSON-safe: infinities and NaN become strings."""
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    return x


def write_json(ctx: Ctx) -> None:
    if not ctx.leader:
        return
    out = Path(ctx.args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(clean({**ctx.results, "problems": ctx.problems}), indent=1))
    tmp.replace(out)


def problem(ctx: Ctx, msg: str, mismatch: bool = True) -> None:
    """Record a problem; a wrong result is said loudly on stdout and stderr."""
    ctx.problems.append(msg)
    if ctx.leader:
        tag = "*** MISMATCH" if mismatch else "*** ERROR"
        print(f"{tag}: {msg}", file=sys.stderr, flush=True)
        if mismatch:
            print(f"{tag}: {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. check


def cudnn_gqa_kernel(q, k, v, causal, scale):
    """Ringserve's cuDNN kernel without its GQA expansion of K and V: the patch this script tests.

    The cuDNN SDPA op accepts fewer KV heads than query heads (a divisor) on its own.
    """
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, T, D]
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, causal, False, scale=scale)
    return res[0][0].transpose(0, 1), res[1][0, :, :, 0].transpose(0, 1).float()


PROPOSED = "cudnn, KV not expanded (proposed)"


def check_cases(n: int) -> list[tuple[int, int, bool]]:
    """(Tq, Tk, causal) for a base size n (4K on GPU): decode, chunk over a prefix, odd sizes, square."""
    return [
        (1, n, True),
        (n // 32, n, True),
        (n // 4 + 1, 3 * n // 4 - 7, True),
        (n, n, True),
        (3 * n // 4, n // 4, True),  # Tq > Tk: the first rows see nothing
        (n // 2, n // 2, False),
        (n // 5 + 3, n // 3, False),
    ]


TOL = {torch.bfloat16: 2e-2, torch.float32: 2e-3}


def section_check(ctx: Ctx) -> None:
    c = ctx.cfg
    h, hkv, d, n = c["heads"], c["kv_heads"], c["head_dim"], c["check"]
    selected = attention.backend_name(ctx.device)
    log(ctx, f"check: attention backend on {ctx.device.type} = {selected!r}")
    kernels = {selected: attention.BACKENDS[selected]}
    if ctx.cuda:  # for information: the other built-in GPU kernel, and the proposed cuDNN one
        kernels.setdefault("flash", attention.BACKENDS["flash"])
        kernels[PROPOSED] = attention.Backend(cudnn_gqa_kernel)
    ref_kernel = attention.BACKENDS["torch"]
    rows, out_rows = [], []
    works = {}  # dtype -> the selected backend ran without error on this rank
    failures: dict = {}  # dtype -> cases where the selected backend raised
    for backend, kernel in kernels.items():
        for dtype in (torch.bfloat16, torch.float32):
            gen = torch.Generator().manual_seed(7)
            for tq, tk, causal in check_cases(n):
                q = randn(gen, (tq, h, d), ctx, dtype)
                k, v = randn(gen, (tk, hkv, d), ctx, dtype), randn(gen, (tk, hkv, d), ctx, dtype)
                ref_out, ref_lse = attention.attend(q.float(), k.float(), v.float(), causal, backend=ref_kernel)
                res, err = attempt(ctx, lambda: attention.attend(q, k, v, causal, backend=kernel))  # noqa: B023
                if backend == selected:
                    works[dtype] = works.get(dtype, True) and err is None
                e_out = e_lse = None
                status = "ERROR"
                if err is None:
                    e_out, e_lse = max_err(res[0], ref_out), max_err(res[1], ref_lse)
                    ok = e_out <= TOL[dtype] and e_lse <= TOL[dtype] and res[0].dtype == dtype
                    status = "ok" if ok else "MISMATCH"
                    if not ok:
                        problem(
                            ctx,
                            f"attend[{backend}] {dtype} Tq={tq} Tk={tk} causal={causal}: "
                            f"|out err|={e_out:.3g} |lse err|={e_lse:.3g} (tol {TOL[dtype]})",
                        )
                elif backend == selected:
                    failures.setdefault(dtype, []).append((tq, tk, causal, err))
                shape = f"Tq={tq} Tk={tk} {'causal' if causal else 'full'}"
                name = f"attend[{backend}]" + (" (selected)" if backend == selected else "")
                rows.append([name, str(dtype)[6:], shape, e_out, e_lse, TOL[dtype], status, err or ""])
                out_rows.append(
                    dict(
                        test=name,
                        dtype=str(dtype),
                        tq=tq,
                        tk=tk,
                        causal=causal,
                        err_out=e_out,
                        err_lse=e_lse,
                        tol=TOL[dtype],
                        status=status,
                        error=err,
                    )
                )
    for dtype, fails in failures.items():  # one line per dtype: fp32 may simply be unsupported
        cases = ", ".join(f"Tq={a} Tk={b}{' causal' if c else ''}" for a, b, c, _ in fails)
        problem(
            ctx,
            f"attend[{selected}] {dtype} raised on {len(fails)} case(s) ({cases}): {fails[0][3]}",
            mismatch=dtype == torch.bfloat16,
        )
    free_memory(ctx)

    # Ring pass-KV / pass-Q over the whole group vs single-device attention, with a cached prefix
    # split unevenly over the ranks (as earlier passes leave it) and T new tokens sharded.
    p, t = n // 4, n - n // 4
    weights = [r + 1 for r in range(ctx.world)]
    cuts = [0] + [p * sum(weights[: r + 1]) // sum(weights) for r in range(ctx.world)]
    cached = tuple(cuts[r + 1] - cuts[r] for r in range(ctx.world))
    plan = plan_pass(t, ctx.world, BLOCK)
    layout = RingLayout(plan, cached)
    comm = RingComm(None)
    for dtype in (torch.bfloat16, torch.float32):
        if not everyone_ok(ctx, works.get(dtype, False)):
            rows.append(["ring (skipped)", str(dtype)[6:], "", None, None, None, "skipped", "attend fails"])
            continue
        gen = torch.Generator().manual_seed(11)
        q = randn(gen, (t, h, d), ctx, dtype)
        k, v = randn(gen, (p + t, hkv, d), ctx, dtype), randn(gen, (p + t, hkv, d), ctx, dtype)
        ref32 = attention.attend(q.float(), k.float(), v.float(), True, backend=ref_kernel)[0]
        ref_same = attention.attend(q, k, v, True)[0]  # single device, the selected backend
        idx = rank_index(plan, ctx.rank, ctx.device)
        local_k = torch.cat([k[cuts[ctx.rank] : cuts[ctx.rank + 1]], k[p + idx]])
        local_v = torch.cat([v[cuts[ctx.rank] : cuts[ctx.rank + 1]], v[p + idx]])
        for name, ring in (("pass-KV", ring_pass_kv), ("pass-Q", ring_pass_q)):
            out, err = attempt(ctx, lambda: ring(q[idx], local_k, local_v, layout, comm))  # noqa: B023
            err = agree(ctx, err)
            e32 = e_same = None
            status = "ERROR"
            if err is None:
                e32 = slowest(ctx, max_err(out, ref32[idx]))
                e_same = slowest(ctx, max_err(out, ref_same[idx]))
                ok = e32 <= TOL[dtype] and e_same <= TOL[dtype] and out.dtype == dtype
                status = "ok" if ok else "MISMATCH"
                if not ok:
                    problem(
                        ctx,
                        f"ring {name} {dtype} over {ctx.world} ranks: |err| vs fp32 ref {e32:.3g}, "
                        f"vs single-device {e_same:.3g} (tol {TOL[dtype]})",
                    )
            else:
                problem(ctx, f"ring {name} {dtype} failed: {err}")
            shape = f"P={p} (per rank {list(cached)}) T={t} N={ctx.world}"
            note = f"vs single-device {selected}: {fmt(e_same)}" if err is None else err
            rows.append([f"ring {name}", str(dtype)[6:], shape, e32, None, TOL[dtype], status, note])
            out_rows.append(
                dict(
                    test=f"ring {name}",
                    dtype=str(dtype),
                    cached=list(cached),
                    new=t,
                    world=ctx.world,
                    err_vs_fp32_ref=e32,
                    err_vs_single_device=e_same,
                    tol=TOL[dtype],
                    status=status,
                    error=err,
                )
            )
        free_memory(ctx)

    ctx.results["check"] = dict(backend=selected, rows=out_rows)
    table(
        ctx,
        f"check: attend and ring vs fp32 reference (backend {selected}, H={h}/{hkv}, d={d})",
        ["test", "dtype", "shape", "max|err| out", "max|err| lse", "tol", "status", "note"],
        rows,
    )


# ----------------------------------------------------------------------------- 2. attention


def _cudnn_op(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)


def _sdpa(q, k, v, backend=None, **kw):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)


def make_qkv(ctx: Ctx, t: int, seed: int):
    """q [T, H, D], k, v [T, Hkv, D] in bf16, the same on every rank (seeded device generator)."""
    c = ctx.cfg
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    q = torch.randn(t, c["heads"], c["head_dim"], generator=gen, device=ctx.device, dtype=torch.bfloat16)
    k = torch.randn(t, c["kv_heads"], c["head_dim"], generator=gen, device=ctx.device, dtype=torch.bfloat16)
    v = torch.randn(t, c["kv_heads"], c["head_dim"], generator=gen, device=ctx.device, dtype=torch.bfloat16)
    return q, k, v


def bare_rows(ctx: Ctx, q, k, v, row) -> None:
    """The bare single-GPU kernel on [1, H, T, D] inputs made here (and freed on return)."""
    from torch.nn.attention import SDPBackend

    h = ctx.cfg["heads"]
    qb, kb, vb = to_bhsd(q), to_bhsd(k), to_bhsd(v)
    ke, ve = to_bhsd(k, h), to_bhsd(v, h)  # expanded before, and outside, the timing
    if ctx.cuda:
        row("bare cuDNN SDPA op (KV expanded to H)", lambda: _cudnn_op(qb, ke, ve))
        row("bare cuDNN SDPA op (GQA: KV heads not expanded)", lambda: _cudnn_op(qb, kb, vb))
        row(
            "bare SDPA enable_gqa (cuDNN forced)",
            lambda: _sdpa(qb, kb, vb, SDPBackend.CUDNN_ATTENTION, enable_gqa=True),
        )
    else:
        row("bare SDPA (cpu; KV expanded to H)", lambda: _sdpa(qb, ke, ve))
        row("bare SDPA enable_gqa (cpu)", lambda: _sdpa(qb, kb, vb, enable_gqa=True))


def attention_one_gpu(ctx: Ctx, t: int, flops: float) -> list[dict]:
    """Rank 0 alone: the bare kernel and ringserve on one GPU."""
    warmup, iters = counts(ctx, flops)
    rows = []

    def row(impl: str, fn, note: str = "") -> None:
        log(ctx, f"attention T={tokens_str(t)}: {impl} ({warmup}+{iters} calls)")
        reset_peak(ctx)
        s, err = attempt(ctx, lambda: bench(ctx, fn, warmup, iters, collective=False))
        rows.append(
            dict(
                tokens=t,
                impl=impl,
                gpus=1,
                ms=s * 1e3 if s else None,
                tflops_per_gpu=flops / s / 1e12 if s else None,
                peak_gib=peak_gib(ctx),
                note=err or note,
                bare=impl.startswith("bare"),
            )
        )

    q, k, v = make_qkv(ctx, t, seed=t)
    bare_rows(ctx, q, k, v, row)
    free_memory(ctx)
    row("ringserve attend (1 GPU, no ring)", lambda: attention.attend(q, k, v, True))
    if ctx.cuda:
        proposed = attention.Backend(cudnn_gqa_kernel)
        row(f"ringserve attend, {PROPOSED}", lambda: attention.attend(q, k, v, True, backend=proposed))
    comm1 = RingComm(ctx.solo)
    layout1 = RingLayout(plan_pass(t, 1, BLOCK), (0,))
    row("ringserve CP1 ring_pass_kv (world 1)", lambda: ring_pass_kv(q, k, v, layout1, comm1))
    return rows


def _torch_cp_api():
    """PyTorch's context_parallel and its option setters (the module path moved in torch 2.9)."""
    try:
        from torch.distributed.tensor.experimental._attention import (
            _cp_options,
            context_parallel,
            set_rotate_method,
        )
    except ImportError:
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _cp_options,
            context_parallel,
            set_rotate_method,
        )
    return context_parallel, _cp_options, set_rotate_method


def torch_cp_row(ctx: Ctx, mesh, q, k, v, rotate: str, warmup: int, iters: int, compare) -> dict:
    """PyTorch's experimental context_parallel on the whole group: MHA-expanded KV, cuDNN or flash."""
    from torch.nn.attention import SDPBackend

    h = ctx.cfg["heads"]
    row = dict(impl=f"torch context_parallel ({rotate})", gpus=ctx.world, ms=None, tflops_per_gpu=None)
    api, err = attempt(ctx, _torch_cp_api)
    if err := agree(ctx, err):
        return {**row, "note": err}
    context_parallel, cp_options, set_rotate_method = api
    set_rotate_method(rotate)
    qb, kb, vb = to_bhsd(q), to_bhsd(k, h), to_bhsd(v, h)  # full sequence; sharded in place below
    # On CPU no SDPA kernel has a CP sharding rule (torch 2.13: the math one fails too): reported.
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if ctx.cuda else [None]
    notes = []
    reset_peak(ctx)
    try:
        cm = context_parallel(mesh, buffers=[qb, kb, vb], buffer_seq_dims=[2, 2, 2], no_restore_buffers={qb, kb, vb})
        _, err = attempt(ctx, cm.__enter__)
        entered = err is None
        if err := agree(ctx, err):
            if entered:  # another rank failed: leave, so F.scaled_dot_product_attention is restored
                cm.__exit__(None, None, None)
            return {**row, "note": f"entering context_parallel: {err}"}
        try:
            balance = "head-tail load balance" if cp_options.enable_load_balance else "no load balance"
            for backend in backends:
                name = backend.name if backend is not None else "default"
                out, err = attempt(ctx, lambda: _sdpa(qb, kb, vb, backend))  # noqa: B023
                if err := agree(ctx, err):
                    notes.append(f"{name}: {err}")
                    continue
                s, err = attempt(ctx, lambda: bench(ctx, lambda: _sdpa(qb, kb, vb, backend), warmup, iters, True))  # noqa: B023
                if err := agree(ctx, err):
                    notes.append(f"{name}: {err}")
                    continue
                row.update(ms=s * 1e3, backend=name, impl=f"torch context_parallel ({rotate}, {name})")
                notes.append(balance)
                if compare is not None and cp_options.enable_load_balance:
                    d = slowest(ctx, max_err(out[0].transpose(0, 1), compare))
                    notes.append(f"max|diff| vs ringserve pass-KV {d:.2g}")
                    row["max_diff_vs_ringserve"] = d
                break
        finally:
            cm.__exit__(None, None, None)
    finally:
        set_rotate_method("allgather")  # the default
    row["peak_gib"] = peak_gib(ctx)
    return {**row, "note": "; ".join(notes)}


def ringserve_cp_rows(ctx: Ctx, t: int, flops: float, q, k, v) -> tuple[list[dict], torch.Tensor | None]:
    """Every rank: ringserve CP pass-KV and pass-Q on this rank's load-balanced shard.

    Also returns this rank's pass-KV output when it can be compared with torch's head-tail shard.
    """
    warmup, iters = counts(ctx, flops / ctx.world)
    plan = plan_pass(t, ctx.world, BLOCK)
    layout = RingLayout(plan, (0,) * ctx.world)
    idx = rank_index(plan, ctx.rank, ctx.device)
    ql, kl, vl = q[idx], k[idx], v[idx]
    comm = RingComm(None)
    rows, last = [], {}

    def call(name, ring):
        last[name] = ring(ql, kl, vl, layout, comm)

    for name, ring in (("pass-KV", ring_pass_kv), ("pass-Q", ring_pass_q)):
        impl = f"ringserve CP{ctx.world} {name}"
        log(ctx, f"attention T={tokens_str(t)}: {impl} ({warmup}+{iters} calls)")
        reset_peak(ctx)
        s, err = attempt(ctx, lambda: bench(ctx, lambda: call(name, ring), warmup, iters, True))  # noqa: B023
        err = agree(ctx, err)
        rows.append(
            dict(
                tokens=t,
                impl=impl,
                gpus=ctx.world,
                ms=s * 1e3 if not err else None,
                tflops_per_gpu=flops / s / ctx.world / 1e12 if not err else None,
                peak_gib=peak_gib(ctx),
                note=err or "",
            )
        )
    # Ringserve's and torch's head-tail sharding agree when T splits into 2N equal block-aligned
    # chunks; then torch's output shard can be compared with ringserve's row by row.
    chunk = t // (2 * ctx.world)
    same = t % (2 * ctx.world) == 0 and all(pc == (i * chunk, (i + 1) * chunk) for i, pc in enumerate(plan.pieces))
    return rows, (last.get("pass-KV") if same else None)


def attention_multi_gpu(ctx: Ctx, t: int, flops: float, mesh) -> list[dict]:
    """Every rank: ringserve CP (pass-KV, pass-Q), then torch's context_parallel, on all GPUs."""
    q, k, v = make_qkv(ctx, t, seed=t)  # the whole sequence, identical on every rank
    rows, compare = ringserve_cp_rows(ctx, t, flops, q, k, v)
    free_memory(ctx)
    if mesh is None:
        return rows
    warmup, iters = counts(ctx, flops / ctx.world)
    for rotate in ("allgather", "alltoall"):
        log(ctx, f"attention T={tokens_str(t)}: torch context_parallel ({rotate}) ({warmup}+{iters} calls)")
        r = torch_cp_row(ctx, mesh, q, k, v, rotate, warmup, iters, compare)
        if r["ms"]:
            r["tflops_per_gpu"] = flops / (r["ms"] / 1e3) / ctx.world / 1e12
        rows.append(dict(tokens=t, **r))
        free_memory(ctx)
    return rows


def section_attention(ctx: Ctx) -> None:
    c = ctx.cfg
    h, d = c["heads"], c["head_dim"]
    mesh = None
    if ctx.world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh, err = attempt(ctx, lambda: init_device_mesh(ctx.device.type, (ctx.world,), mesh_dim_names=("cp",)))
        if agree(ctx, err):
            mesh = None
    rows: list[dict] = []
    for t in c["attention"]:
        flops = 2.0 * t * t * h * d
        rows += leader_only(ctx, lambda: attention_one_gpu(ctx, t, flops)) or []  # noqa: B023
        if ctx.world > 1:
            rows += attention_multi_gpu(ctx, t, flops, mesh)
        ctx.results["attention"] = rows
        write_json(ctx)
    for t in c["attention"]:  # each row against the best bare single-GPU kernel at that size
        bare = [r["tflops_per_gpu"] for r in rows if r["tokens"] == t and r.get("bare") and r["tflops_per_gpu"]]
        for r in rows:
            if r["tokens"] == t and bare and r["tflops_per_gpu"]:
                r["vs_best_bare"] = r["tflops_per_gpu"] / max(bare)
    ctx.results["attention"] = rows
    table(
        ctx,
        f"attention: causal full prefill, bf16, H={h}/{c['kv_heads']}, d={d}; TF/s per {ctx.unit} "
        f"(causal FLOPs 2*T^2*H*D / time / {ctx.unit}s)",
        ["tokens", "implementation", ctx.unit + "s", "ms", "TF/s/" + ctx.unit, "vs bare", "peak GiB", "note"],
        [
            [
                tokens_str(r["tokens"]),
                r["impl"],
                r["gpus"],
                r["ms"],
                r["tflops_per_gpu"],
                r.get("vs_best_bare"),
                r.get("peak_gib"),
                r.get("note", ""),
            ]
            for r in rows
        ],
    )


# ----------------------------------------------------------------------------- 3. missrate


def section_missrate(ctx: Ctx) -> None:
    c = ctx.cfg
    h, hkv, d = c["heads"], c["kv_heads"], c["head_dim"]
    if ctx.world < 2:
        log(ctx, "missrate: needs 2+ ranks, skipped")
        ctx.results["missrate"] = dict(skipped="needs 2 or more ranks")
        return
    log(ctx, "missrate: measure_rates")
    rates = measure_rates(None, ctx.device, torch.bfloat16, h, hkv, d)
    e = 2  # bf16
    t_hidden = ctx.world * rates.compute * hkv * e / (2 * h * rates.bandwidth)
    log(
        ctx,
        f"missrate: measured compute {rates.compute / 1e12:.1f} TF/s per {ctx.unit}, ring bandwidth "
        f"{rates.bandwidth / 1e9:.1f} GB/s; pass-KV hidden for T >= {t_hidden:.0f}",
    )
    comm = RingComm(None)
    rows, table_rows = [], []
    for total in c["missrate"]:
        for m in MISS_RATES:
            t = max(1, round(total * m))
            p = total - t
            cached = tuple(p // ctx.world + (1 if r < p % ctx.world else 0) for r in range(ctx.world))
            plan = plan_pass(t, ctx.world, BLOCK)
            layout = RingLayout(plan, cached)
            n = plan.rank_len(ctx.rank)
            gen = torch.Generator(device=ctx.device).manual_seed(1000 + ctx.rank)
            q = torch.randn(n, h, d, generator=gen, device=ctx.device, dtype=torch.bfloat16)
            kv_len = cached[ctx.rank] + n
            k = torch.randn(kv_len, hkv, d, generator=gen, device=ctx.device, dtype=torch.bfloat16)
            v = torch.randn(kv_len, hkv, d, generator=gen, device=ctx.device, dtype=torch.bfloat16)
            flops = 2.0 * t * t * h * d + 4.0 * t * p * h * d
            warmup, iters = counts(ctx, flops / ctx.world, target_s=0.5)
            times = {}
            for name, ring in (("pass_kv", ring_pass_kv), ("pass_q", ring_pass_q)):
                log(ctx, f"missrate {m:.1%} T={t} P={p}: {name} ({warmup}+{iters} calls)")
                s, err = attempt(ctx, lambda: bench(ctx, lambda: ring(q, k, v, layout, comm), warmup, iters, True))  # noqa: B023
                times[name] = None if agree(ctx, err) else s
            pick = choose_strategy("auto", t, p, ctx.world, h, hkv, e, rates)
            q_threshold = 2 * hkv / h - 4 * t * rates.bandwidth / (ctx.world * rates.compute * e)
            tkv, tq = times["pass_kv"], times["pass_q"]
            winner = right = margin = None
            if tkv and tq:
                winner = "pass_kv" if tkv <= tq else "pass_q"
                margin = abs(tkv - tq) / min(tkv, tq)
                right = pick == winner or margin < 0.02  # within 2%: either is right
            rows.append(
                dict(
                    total=total,
                    miss_rate=m,
                    new=t,
                    cached=p,
                    pass_kv_ms=tkv and tkv * 1e3,
                    pass_q_ms=tq and tq * 1e3,
                    winner=winner,
                    margin=margin,
                    auto_pick=pick,
                    pick_right=right,
                    q_threshold=q_threshold,
                    tflops_per_gpu_best=flops / min(tkv, tq) / ctx.world / 1e12 if tkv and tq else None,
                )
            )
            table_rows.append(
                [
                    f"{m:.1%}",
                    t,
                    p,
                    tkv and tkv * 1e3,
                    tq and tq * 1e3,
                    winner,
                    f"{margin:.1%}" if margin is not None else None,
                    pick,
                    right,
                    q_threshold,
                    rows[-1]["tflops_per_gpu_best"],
                ]
            )
            free_memory(ctx)
    ctx.results["missrate"] = dict(
        rates=dict(compute_flops=rates.compute, bandwidth_bytes_s=rates.bandwidth),
        pass_kv_hidden_above_tokens=t_hidden,
        rows=rows,
    )
    table(
        ctx,
        f"missrate: one layer's attention at P+T={'/'.join(tokens_str(x) for x in c['missrate'])}, "
        f"CP{ctx.world}, bf16, H={h}/{hkv}, d={d}; measure_rates: {rates.compute / 1e12:.1f} TF/s, "
        f"{rates.bandwidth / 1e9:.1f} GB/s -> pass-KV hidden for T >= {t_hidden:.0f}",
        [
            "miss",
            "T",
            "P",
            "pass-KV ms",
            "pass-Q ms",
            "winner",
            "margin",
            "auto pick",
            "pick right",
            "pass-Q if miss <",
            "TF/s/" + ctx.unit,
        ],
        table_rows,
    )


# ----------------------------------------------------------------------------- 4. model


def model_flops(config: ModelConfig, n_params: int, t: int) -> float:
    """2*N*T + L * 2*T^2*H*D + 2*hidden*vocab (see the module docstring)."""
    attn = config.num_hidden_layers * 2.0 * t * t * config.num_attention_heads * config.head_dim
    return 2.0 * n_params * t + attn + 2.0 * config.hidden_size * config.vocab_size


def build_model(ctx: Ctx, config: ModelConfig) -> Llama:
    """Random bf16 weights made on the device: normal(0, 0.02) for matrices, norms left at one."""
    torch.manual_seed(0)  # the same weights on every rank (CP replicates them)
    with torch.device(ctx.device), default_dtype(torch.bfloat16):
        model = Llama(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def time_prefill(ctx: Ctx, runner: CPRunner, ids: list[int], warmup: int, iters: int, collective: bool):
    """(seconds, rank 0's logits, peak GiB) of one CP prefill of ``ids`` from an empty sequence."""

    last = {}

    def once():
        seq = CPSequence()
        try:
            last["logits"] = runner.prefill(seq, ids)
        finally:
            runner.release(seq)

    reset_peak(ctx)
    s = bench(ctx, once, warmup, iters, collective)
    return s, last["logits"], peak_gib(ctx)


def hf_rows(ctx: Ctx, model: Llama, config: ModelConfig, sizes, n_params: int, ours_logits: dict) -> list[dict]:
    """Rank 0: transformers' LlamaForCausalLM (sdpa) on the same weights, timed the same way."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**config.to_hf(), attn_implementation="sdpa")
    with torch.device(ctx.device), default_dtype(torch.bfloat16):
        hf = LlamaForCausalLM(hf_config)
    hf.load_state_dict(model.state_dict(), assign=True)  # shares our tensors: no second copy
    hf.eval()
    free_memory(ctx)
    params = inspect.signature(hf.forward).parameters
    keep_kw = "logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep"
    impl = f"HF transformers {transformers.__version__} ({hf.config._attn_implementation})"
    rows = []
    for t in sizes:
        ids = torch.tensor([make_ids(config, t)], device=ctx.device)
        flops = model_flops(config, n_params, t)
        warmup, iters = counts(ctx, flops, target_s=3.0, min_iters=1)
        log(ctx, f"model T={tokens_str(t)}: {impl} ({warmup}+{iters} calls)")

        last = {}

        def fwd():
            with torch.inference_mode():
                last["logits"] = hf(input_ids=ids, use_cache=False, **{keep_kw: 1}).logits  # noqa: B023

        reset_peak(ctx)
        s, err = attempt(ctx, lambda: bench(ctx, fwd, warmup, iters, collective=False))  # noqa: B023
        diff = None
        if err is None and t in ours_logits:
            diff = max_err(last["logits"][0, -1], ours_logits[t])
        rows.append(
            dict(
                tokens=t,
                impl=impl,
                gpus=1,
                ms=s * 1e3 if s else None,
                tflops_per_gpu=flops / s / 1e12 if s else None,
                peak_gib=peak_gib(ctx),
                logits_diff_vs_ours_1gpu=diff,
                note=err or f"{keep_kw}=1, use_cache=False",
            )
        )
        free_memory(ctx)
    return rows


def make_ids(config: ModelConfig, t: int) -> list[int]:
    return torch.randint(0, config.vocab_size, (t,), generator=torch.Generator().manual_seed(t)).tolist()


def ours_one_gpu(ctx: Ctx, runner: CPRunner, config: ModelConfig, t: int, flops: float, logits: dict) -> dict:
    warmup, iters = counts(ctx, flops, target_s=3.0, min_iters=1)
    log(ctx, f"model T={tokens_str(t)}: ringserve CPRunner on 1 {ctx.unit} ({warmup}+{iters} calls)")
    res, err = attempt(ctx, lambda: time_prefill(ctx, runner, make_ids(config, t), warmup, iters, False))
    if res:
        logits[t] = res[1]
    return dict(
        tokens=t,
        impl="ringserve CPRunner.prefill (pass_kv)",
        gpus=1,
        ms=res[0] * 1e3 if res else None,
        tflops_per_gpu=flops / res[0] / 1e12 if res else None,
        peak_gib=res[2] if res else None,
        note=err or "reference for |dlogits|",
    )


def ours_all_gpus(ctx: Ctx, runner: CPRunner, config: ModelConfig, t: int, flops: float, logits: dict) -> dict:
    warmup, iters = counts(ctx, flops / ctx.world, target_s=3.0, min_iters=1)
    log(ctx, f"model T={tokens_str(t)}: ringserve CPRunner on {ctx.world} {ctx.unit}s ({warmup}+{iters} calls)")
    res, err = attempt(ctx, lambda: time_prefill(ctx, runner, make_ids(config, t), warmup, iters, True))
    err = agree(ctx, err)
    ok = err is None
    peak = slowest(ctx, res[2] or 0.0) if ok and ctx.cuda else None
    diff = max_err(res[1], logits[t]) if ok and ctx.leader and t in logits else None
    return dict(
        tokens=t,
        impl=f"ringserve CPRunner.prefill ({runner.last_strategy})",
        gpus=ctx.world,
        ms=res[0] * 1e3 if ok else None,
        tflops_per_gpu=flops / res[0] / ctx.world / 1e12 if ok else None,
        peak_gib=peak,
        logits_diff_vs_ours_1gpu=diff,
        note=err or "",
    )


def ours_rows(ctx: Ctx, model: Llama, config: ModelConfig, n_params: int) -> tuple[list[dict], dict]:
    """Ringserve's CP prefill at each size on one GPU (rank 0) and on all; the KV cache lives here."""
    sizes = ctx.cfg["model"]
    num_blocks = blocks_needed(max(sizes), BLOCK) + 2
    cache = KVCache(config, num_blocks=num_blocks, block_size=BLOCK, dtype=torch.bfloat16, device=ctx.device)
    log(
        ctx,
        f"model: {n_params / 1e9:.2f} B non-embedding parameters; KV cache of {num_blocks} blocks of "
        f"{BLOCK} = {2 * cache.k.numel() * cache.k.element_size() / 2**30:.1f} GiB per {ctx.unit}",
    )
    runner1 = CPRunner(model, cache, group=ctx.solo, strategy="pass_kv") if ctx.leader else None
    runner_n = CPRunner(model, cache, strategy=ctx.args.model_strategy) if ctx.world > 1 else None
    rows, logits = [], {}
    for t in sizes:
        flops = model_flops(config, n_params, t)
        rows.append(leader_only(ctx, lambda: ours_one_gpu(ctx, runner1, config, t, flops, logits)))  # noqa: B023
        if runner_n is not None:
            rows.append(ours_all_gpus(ctx, runner_n, config, t, flops, logits))
        ctx.results["model"] = dict(config=config.to_hf(), non_embedding_params=n_params, rows=rows[:])
        write_json(ctx)
    return rows, logits


def section_model(ctx: Ctx) -> None:
    sizes = ctx.cfg["model"]
    config = ModelConfig(
        **ctx.cfg["llama"], max_position_embeddings=max([131072] + sizes), rms_norm_eps=1e-5, rope_theta=500000.0
    )
    log(ctx, f"model: building {config.num_hidden_layers}-layer model on {ctx.device} (random bf16)")
    model = build_model(ctx, config)
    n_params = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("model.embed_tokens", "lm_head"))
    )
    rows, ours_logits = ours_rows(ctx, model, config, n_params)
    free_memory(ctx)  # the KV cache: Hugging Face's forward keeps its own activations
    hf = leader_only(ctx, lambda: hf_rows(ctx, model, config, sizes, n_params, ours_logits))
    if ctx.leader:
        rows += hf or [dict(tokens=None, impl="HF transformers", gpus=1, note="failed: see problems")]
    rows = sorted((r for r in rows if r is not None), key=lambda r: r.get("tokens") or 0)  # stable
    ctx.results["model"] = dict(config=config.to_hf(), non_embedding_params=n_params, rows=rows)
    table(
        ctx,
        f"model: TTFT of one prefill, Llama-3-8B shape ({config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}), random bf16; FLOPs 2*N*T + L*2*T^2*H*D + lm_head, N={n_params:,}",
        [
            "tokens",
            "implementation",
            ctx.unit + "s",
            "TTFT ms",
            "TF/s/" + ctx.unit,
            "peak GiB",
            "|dlogits| vs 1-GPU",
            "note",
        ],
        [
            [
                tokens_str(r["tokens"]) if r.get("tokens") else "-",
                r["impl"],
                r["gpus"],
                r.get("ms"),
                r.get("tflops_per_gpu"),
                r.get("peak_gib"),
                r.get("logits_diff_vs_ours_1gpu"),
                r.get("note", ""),
            ]
            for r in rows
        ],
    )


# ----------------------------------------------------------------------------- main


def parse_tokens(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": K, "M": K * K}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="cp.json", help="JSON file with every number")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and sizes (CPU testing)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument(
        "--sizes",
        action="append",
        default=[],
        help="token counts: '32K,128K' (attention and model) or 'SECTION=32K,...' "
        "(attention, missrate, model, check); repeatable",
    )
    ap.add_argument("--backend", default=None, help="force ringserve's attention backend (cudnn, flash, ...)")
    ap.add_argument(
        "--model-strategy",
        default="pass_kv",
        choices=("pass_kv", "pass_q", "auto"),
        help="CP strategy of the multi-GPU model rows",
    )
    ap.add_argument(
        "--watchdog-s",
        type=float,
        default=540.0,
        help="seconds from start after which the script writes what it has and exits (a hung "
        "collective, or a run past the GPU box's 600 s command limit)",
    )
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of caught errors")
    args = ap.parse_args()
    bad = set(args.sections.split(",")) - set(SECTIONS)
    if bad:
        ap.error(f"unknown sections {sorted(bad)}; choose from {SECTIONS}")
    return args


def sizes_config(args) -> dict:
    cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in (TINY if args.tiny else FULL).items()}
    for spec in args.sizes:
        key, _, values = spec.rpartition("=")
        nums = [parse_tokens(x) for x in values.split(",") if x.strip()]
        for name in [key] if key else ["attention", "model"]:
            if name not in ("attention", "missrate", "model", "check"):
                raise SystemExit(f"--sizes: unknown section {name!r}")
            cfg[name] = nums[0] if name == "check" else nums
    return cfg


def start_watchdog(ctx: Ctx) -> None:
    def fire():
        log(
            ctx,
            f"WATCHDOG: {ctx.args.watchdog_s:.0f} s passed, stuck in section {ctx.section!r}; "
            "writing partial results and exiting",
            everyone=True,
        )
        ctx.results["watchdog"] = f"exited after {ctx.args.watchdog_s:.0f} s in section {ctx.section}"
        with contextlib.suppress(Exception):
            write_json(ctx)
        os._exit(3)

    timer = threading.Timer(max(1.0, ctx.args.watchdog_s - (time.perf_counter() - START)), fire)
    timer.daemon = True
    timer.start()


def main() -> None:
    args = parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "MASTER_ADDR" not in os.environ:  # plain `python bench/cp_gpu.py`: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    else:
        device = torch.device("cpu")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if args.backend:
        attention.set_backend(args.backend, device.type)
    init_group(rank, world, "env://", device, timeout_s=30 * 60)
    solo = dist.new_group([0]) if world > 1 else None  # every rank must take part in creating it
    ctx = Ctx(args=args, rank=rank, world=world, device=device, solo=solo, cfg=sizes_config(args))
    start_watchdog(ctx)
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    ctx.results["meta"] = dict(
        argv=sys.argv,
        world=world,
        device=torch.cuda.get_device_name(device) if ctx.cuda else "cpu",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if ctx.cuda else None,
        transformers=tf_version,
        attention_backend=attention.backend_name(device),
        shapes=dict(heads=ctx.cfg["heads"], kv_heads=ctx.cfg["kv_heads"], head_dim=ctx.cfg["head_dim"]),
        sizes={k: ctx.cfg[k] for k in ("check", "attention", "missrate", "model")},
    )
    log(
        ctx,
        f"{world} rank(s) on {ctx.results['meta']['device']}, torch {torch.__version__}, "
        f"attention backend {ctx.results['meta']['attention_backend']!r}, sections {args.sections}",
    )
    funcs = dict(check=section_check, attention=section_attention, missrate=section_missrate, model=section_model)
    for name in SECTIONS:
        if name not in args.sections.split(","):
            continue
        ctx.section = name
        t0 = time.perf_counter()
        _, err = attempt(ctx, lambda: funcs[name](ctx))  # noqa: B023
        if err:
            ctx.results.setdefault(name, {})
            if isinstance(ctx.results[name], dict):
                ctx.results[name]["error"] = err
            problem(ctx, f"section {name} failed: {err}")
        ctx.results.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        log(ctx, f"section {name} done in {time.perf_counter() - t0:.1f} s")
        write_json(ctx)
        dist.barrier()
    ctx.results["total_seconds"] = time.perf_counter() - ctx.t0
    write_json(ctx)
    if ctx.leader:
        print(
            "\n"
            + (
                f"{len(ctx.problems)} PROBLEM(S):\n  " + "\n  ".join(ctx.problems)
                if ctx.problems
                else "all correctness checks passed"
            ),
            flush=True,
        )
        log(ctx, f"done in {ctx.results['total_seconds']:.0f} s; results in {args.out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
