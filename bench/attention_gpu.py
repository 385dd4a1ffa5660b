"""``attend`` on one GPU beside the bare kernels it wraps (flash-attn-4, cuDNN SDPA), in one process.

    python bench/attention_gpu.py --out $OUT/attention.json

Sections (``--sections``, default all, in this order; bf16, 32 query / 8 KV heads, d = 128 unless said):

compile  seconds of the first call of each flash-attn-4 kernel variant ``attend`` uses (causal, full,
         packed), and of a later call at a new shape (no new compile expected: FA4 keys its compiled
         kernels on head dims, dtype, masks and tiles, not on sequence lengths).
check    ``attend`` and ``attend_packed`` with each CUDA backend against the plain kernel in fp32:
         square causal, a chunk over a prefix, Tq > Tk, one query, full attention, packed sequences;
         also the embedded model's heads (9 / 3, d = 64). Max |error| of out and LSE.
shapes   causal TF/s: square 8K, 32K, 128K and short queries over long keys (2K over 32K, 4K over
         128K): bare flash-attn-4, ``attend`` (flash_attn4: one call), bare cuDNN (square only: it
         masks top-left), ``attend`` (cudnn: a full call over the prefix, a square one, a merge).
packed   a pass of N sequences of L tokens each (the issue's burst: 64 x 2K): ``attend_packed`` (one
         varlen call, keys concatenated), bare varlen FA4 on keys packed beforehand, a loop of
         ``attend`` per sequence with flash_attn4 and with cudnn.
forward  ``CPRunner.prefill`` (CP 1, pass of one sequence) of the Llama-3-8B shape, random bf16, at
         ``--forward-tokens`` with each backend; TF/s as bench/cp_gpu.py counts them.

FLOPs (a multiply-add is 2): causal Tq over Tk keys (queries the last Tq) = 4 Tq (Tk - Tq) H D +
2 Tq^2 H D; model = 2 N T + L * 2 T^2 H D + 2 hidden vocab (N: non-embedding parameters).
Times: CUDA events around a fixed count of calls after warm-up calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from shapes import LLAMA3_8B  # noqa: E402

from ringserve.engine import attention  # noqa: E402
from ringserve.engine.attention import attend, attend_packed  # noqa: E402

K = 1024
H, HKV, D = 32, 8, 128
SECTIONS = ("compile", "check", "shapes", "packed", "forward")
RESULTS: dict = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def qkv(tq: int, tk: int, h: int = H, hkv: int = HKV, d: int = D, seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (
        torch.randn(tq, h, d, generator=g, device="cuda", dtype=dtype),
        torch.randn(tk, hkv, d, generator=g, device="cuda", dtype=dtype),
        torch.randn(tk, hkv, d, generator=g, device="cuda", dtype=dtype),
    )


def causal_flops(tq: int, tk: int, h: int = H, d: int = D) -> float:
    return 4.0 * tq * (tk - tq) * h * d + 2.0 * tq * tq * h * d


def seconds(fn, min_s: float = 0.4, max_iters: int = 50) -> float:
    """Seconds per call: warm-up, then a count of calls sized from one call, between CUDA events."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    iters = int(min(max_iters, max(3, min_s / max(time.perf_counter() - t0, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def fa4_bare(q, k, v, causal=True):
    from flash_attn.cute import flash_attn_func

    return flash_attn_func(q, k, v, causal=causal, return_lse=True)


def cudnn_bare(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)


def table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), flush=True)


def section_compile(args) -> None:
    t0 = time.perf_counter()
    from flash_attn.cute import flash_attn_varlen_func

    RESULTS["fa4_import_s"] = time.perf_counter() - t0
    log(f"compile: importing flash_attn.cute took {RESULTS['fa4_import_s']:.1f} s")
    fa4 = attention.BACKENDS["flash_attn4"]
    q, k, v = qkv(2 * K, 6 * K)
    cu = torch.tensor([0, K, 2 * K], dtype=torch.int32, device="cuda")
    cases = [
        ("causal, 2K over 6K", lambda: attend(q, k, v, True, backend=fa4)),
        ("causal, square 6K (a new shape)", lambda: attend(*qkv(6 * K, 6 * K, seed=3), True, backend=fa4)),
        ("full (non-causal)", lambda: attend(q, k, v, False, backend=fa4)),
        (
            "packed (varlen, causal)",
            lambda: flash_attn_varlen_func(
                q,
                k[: 2 * K],
                v[: 2 * K],
                cu_seqlens_q=cu,
                cu_seqlens_k=cu,
                max_seqlen_q=K,
                max_seqlen_k=K,
                causal=True,
                return_lse=True,
            ),
        ),
        ("causal, a new shape (3000 over 7001)", lambda: attend(*qkv(3000, 7001, seed=1), True, backend=fa4)),
        (
            "causal, d = 64, 9 / 3 heads (the embedded model)",
            lambda: attend(*qkv(K, 3 * K, 9, 3, 64, seed=2), True, backend=fa4),
        ),
    ]
    rows = []
    for name, fn in cases:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:
            rows.append(dict(variant=name, error=repr(e)))
            log(f"compile: {name}: {e!r}")
            continue
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        rows.append(dict(variant=name, first_call_s=first, second_call_s=time.perf_counter() - t0))
        log(f"compile: {name}: first call {first:.2f} s")
    RESULTS["compile"] = rows
    table(
        "compile: flash-attn-4's first call per variant",
        ["variant", "first call s", "second call s"],
        [[r["variant"], r.get("first_call_s", r.get("error")), r.get("second_call_s", "-")] for r in rows],
    )


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    same_inf = torch.isinf(a) & (a == b)
    return float(torch.where(same_inf, 0.0, (a - b).abs()).max()) if a.numel() else 0.0


def check_row(name: str, heads: tuple[int, int, int], lens: list[tuple[int, int]], causal: bool, seed: int) -> list:
    """attend (one sequence) or attend_packed (several; causal) in bf16 vs the fp32 plain kernel."""
    h, hkv, d = heads
    backend, ref = attention.BACKENDS[name], attention.BACKENDS["torch"]
    q = torch.cat([qkv(n, 1, h, hkv, d, seed=seed + i)[0] for i, (n, _) in enumerate(lens)])
    keys, values = zip(*[qkv(1, m, h, hkv, d, seed=seed + 50 + i)[1:] for i, (_, m) in enumerate(lens)])
    shape = " + ".join(f"{n} over {m}" for n, m in lens)
    try:
        if len(lens) == 1:
            out, lse = attend(q, keys[0], values[0], causal, backend=backend)
        else:
            out, lse = attend_packed(q, keys, values, [n for n, _ in lens], backend=backend)
    except Exception as e:
        return [name, f"{h}/{hkv} d{d}", shape, causal, None, None, f"ERROR {e!r}"[:200]]
    parts = [
        attend(qs.float(), k.float(), v.float(), causal, backend=ref)
        for qs, k, v in zip(q.split([n for n, _ in lens]), keys, values)
    ]
    e_out, e_lse = max_err(out, torch.cat([p[0] for p in parts])), max_err(lse, torch.cat([p[1] for p in parts]))
    status = "ok" if e_out <= 2e-2 and e_lse <= 2e-2 else "MISMATCH"
    return [name, f"{h}/{hkv} d{d}", shape, causal, e_out, e_lse, status]


def section_check(args) -> None:
    cases = [
        ([(2 * K, 2 * K)], True),
        ([(512, 4 * K + 64)], True),  # a chunk over a prefix
        ([(3 * K, K)], True),  # Tq > Tk: the first rows see nothing
        ([(1, 4 * K)], True),
        ([(K, 3000)], False),
        ([(300, 300), (1000, 2500), (64, 64), (700, 4001)], True),  # packed
    ]
    rows = [
        check_row(name, heads, lens, causal, seed=10 * i)
        for name in ("flash_attn4", "cudnn")
        for heads in ((H, HKV, D), (9, 3, 64))
        for i, (lens, causal) in enumerate(cases)
    ]
    RESULTS["check"] = dict(rows=rows, bad=sum(r[-1] != "ok" for r in rows))
    table(
        "check: bf16 attend vs the fp32 plain kernel (tolerance 2e-2)",
        ["backend", "heads", "shape", "causal", "max|err| out", "max|err| lse", "status"],
        [[c if c is not None else "-" for c in r] for r in rows],
    )


def shape_row(tq: int, tk: int) -> dict:
    """One causal shape: bare FA4, attend (flash_attn4), bare cuDNN (square only), attend (cudnn)."""
    fa4, cudnn = attention.BACKENDS["flash_attn4"], attention.BACKENDS["cudnn"]
    q, k, v = qkv(tq, tk, seed=tq + tk)
    qb, kb, vb = (x.unsqueeze(0) for x in (q, k, v))  # FA4's [1, T, H, D]
    qc, kc, vc = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # cuDNN's [1, H, T, D] views
    t = {
        "bare_fa4": seconds(lambda: fa4_bare(qb, kb, vb)),
        "attend_fa4": seconds(lambda: attend(q, k, v, True, backend=fa4)),
        "bare_cudnn": seconds(lambda: cudnn_bare(qc, kc, vc)) if tq == tk else None,
        "attend_cudnn": seconds(lambda: attend(q, k, v, True, backend=cudnn)),
    }
    flops = causal_flops(tq, tk)
    tf = {name: (flops / s / 1e12 if s else None) for name, s in t.items()}
    log(f"shapes: {tq} over {tk}: " + ", ".join(f"{n} {x:.0f}" for n, x in tf.items() if x))
    return dict(
        tq=tq,
        tk=tk,
        flops=flops,
        seconds=t,
        tflops=tf,
        attend_vs_bare_fa4=tf["attend_fa4"] / tf["bare_fa4"],
        fa4_vs_cudnn=tf["attend_fa4"] / tf["attend_cudnn"],
    )


def section_shapes(args) -> None:
    shapes = [(8 * K, 8 * K), (32 * K, 32 * K), (128 * K, 128 * K), (2 * K, 32 * K), (4 * K, 128 * K)]
    rows = [shape_row(tq, tk) for tq, tk in shapes]
    RESULTS["shapes"] = rows
    table(
        "shapes: causal TF/s, bf16, 32 q / 8 kv heads, d 128",
        ["Tq over Tk", "bare FA4", "attend (flash_attn4)", "attend / bare FA4", "bare cuDNN", "attend (cudnn)",
         "attend FA4 / attend cuDNN"],
        [
            [
                f"{r['tq'] // K}K over {r['tk'] // K}K",
                r["tflops"]["bare_fa4"],
                r["tflops"]["attend_fa4"],
                r["attend_vs_bare_fa4"],
                r["tflops"]["bare_cudnn"] or "-",
                r["tflops"]["attend_cudnn"],
                r["fa4_vs_cudnn"],
            ]
            for r in rows
        ],
    )  # fmt: skip


def packed_row(n: int, length: int) -> dict:
    """A pass of ``n`` sequences of ``length`` new tokens each, no cached prefix."""
    from flash_attn.cute import flash_attn_varlen_func

    fa4, cudnn = attention.BACKENDS["flash_attn4"], attention.BACKENDS["cudnn"]
    q, k, v = qkv(n * length, n * length, seed=n)
    keys, values = list(k.split(length)), list(v.split(length))  # views, as the cache's reads give them
    lens = [length] * n
    cu = torch.arange(0, n * length + 1, length, dtype=torch.int32, device="cuda")

    def loop(backend):
        return [attend(qs, kk, vv, True, backend=backend) for qs, kk, vv in zip(q.split(lens), keys, values)]

    def bare():
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=length, max_seqlen_k=length, causal=True,
            return_lse=True,
        )  # fmt: skip

    t = {
        "attend_packed_fa4": seconds(lambda: attend_packed(q, keys, values, lens, backend=fa4)),
        "bare_varlen_fa4": seconds(bare),
        "loop_attend_fa4": seconds(lambda: loop(fa4)),
        "loop_attend_cudnn": seconds(lambda: loop(cudnn)),
    }
    flops = n * causal_flops(length, length)
    tf = {name: flops / s / 1e12 for name, s in t.items()}
    log(f"packed: {n} x {length}: " + ", ".join(f"{name} {x:.0f}" for name, x in tf.items()))
    return dict(sequences=n, length=length, flops=flops, seconds=t, tflops=tf)


def section_packed(args) -> None:
    rows = [packed_row(n, length) for n, length in ((64, 2 * K), (8, 8 * K))]
    RESULTS["packed"] = rows
    table(
        "packed: N causal sequences in one pass, TF/s",
        ["N x L", "attend_packed (FA4 varlen)", "bare FA4 varlen (keys pre-packed)", "loop attend FA4",
         "loop attend cuDNN"],
        [[f"{r['sequences']} x {r['length']}", *r["tflops"].values()] for r in rows],
    )  # fmt: skip


def section_forward(args) -> None:
    from ringserve.engine.config import ModelConfig
    from ringserve.engine.kv_cache import KVCache, blocks_needed
    from ringserve.engine.model import Llama
    from ringserve.prefill_service.context_parallel import CPRunner, CPSequence

    t = args.forward_tokens
    config = ModelConfig.from_hf(LLAMA3_8B)
    model = Llama.random(config, torch.bfloat16, torch.device("cuda", 0), 0)
    n_params = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("model.embed_tokens", "lm_head"))
    )
    flops = (
        2.0 * n_params * t
        + config.num_hidden_layers * 2.0 * t * t * config.num_attention_heads * config.head_dim
        + 2.0 * config.hidden_size * config.vocab_size
    )
    cache = KVCache(config, blocks_needed(t, 64) + 8, 64, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    runner = CPRunner(model, cache, strategy="pass_kv")
    ids = torch.randint(0, config.vocab_size, (t,), generator=torch.Generator().manual_seed(0)).tolist()

    def once():
        seq = CPSequence()
        try:
            return runner.prefill([seq], [ids])[0]
        finally:
            cache.allocator.free(seq.block_table)

    rows, logits = [], {}
    for name in ("flash_attn4", "cudnn"):
        attention.set_backend(name)
        once()  # warm-up: compiles, plans
        torch.cuda.synchronize()
        times = []
        for _ in range(args.forward_iters):
            t0 = time.perf_counter()
            logits[name] = once()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        s = min(times)
        rows.append(dict(backend=name, tokens=t, seconds=times, tflops=flops / s / 1e12))
        log(f"forward: {t} tokens, {name}: {s:.3f} s, {flops / s / 1e12:.0f} TF/s")
    attention.set_backend(None)
    diff = max_err(logits["flash_attn4"], logits["cudnn"])
    RESULTS["forward"] = dict(rows=rows, flops=flops, non_embedding_params=n_params, logits_max_diff=diff)
    table(
        f"forward: CPRunner.prefill (CP 1) of {t} tokens, Llama-3-8B shape, random bf16; |dlogits| {diff:.3g}",
        ["backend", "s", "TF/s"],
        [[r["backend"], min(r["seconds"]), r["tflops"]] for r in rows],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="attention.json")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--forward-tokens", type=int, default=128 * K)
    ap.add_argument("--forward-iters", type=int, default=1)
    args = ap.parse_args()
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29513", rank=0, world_size=1)  # CPRunner's group
    torch.cuda.set_device(0)
    RESULTS["meta"] = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        gpu=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        default_backend=attention.backend_name(torch.device("cuda")),
    )
    log(f"{RESULTS['meta']}")
    funcs = dict(
        compile=section_compile,
        check=section_check,
        shapes=section_shapes,
        packed=section_packed,
        forward=section_forward,
    )
    for name in SECTIONS:
        if name in args.sections.split(","):
            t0 = time.perf_counter()
            try:
                funcs[name](args)
            except Exception as e:  # record it; the other sections still run
                traceback.print_exc()
                RESULTS.setdefault("errors", {})[name] = repr(e)
            RESULTS.setdefault("section_s", {})[name] = time.perf_counter() - t0
            Path(args.out).write_text(json.dumps(RESULTS, indent=1, default=str))
            torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
