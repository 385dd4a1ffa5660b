"""Where the served path's GPU time goes: the decode step and chunked prefill passes, measured bare
and under torch.profiler (kernel time against wall time: the gap is host work and syncs).

    python bench/profile_gpu.py --out-dir $OUT

decode   ``KVPRank.step`` (the decode tier's step, CUDA graphs) at batch B over C-token contexts,
         alone and followed by what the decode loop does each step (``sample_batch`` + one copy to
         the host); the HBM floor beside it.
prefill  ``CPRunner.prefill`` on one GPU: a P-token prompt in one pass, and the same prompt in
         chunks of K tokens (each pass timed); one late chunk profiled.
Both sections write a profiler table (top kernels by device time) and a JSON of every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from shapes import LLAMA3_8B  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from ringserve.decode_service.kvp import KVPRank, StepEntry  # noqa: E402
from ringserve.engine.config import ModelConfig  # noqa: E402
from ringserve.engine.kv_cache import KVCache, blocks_needed  # noqa: E402
from ringserve.engine.model import Llama  # noqa: E402
from ringserve.engine.sampling import SamplingParams, sample_batch  # noqa: E402
from ringserve.prefill_service.context_parallel import CPRunner, CPSequence  # noqa: E402

BLOCK = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wall(fn, iters: int, warmup: int = 3) -> list[float]:
    """Host seconds of each call, synchronized after each (what a serving loop sees)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def device_s(fn, iters: int) -> float:
    """Device seconds per call between CUDA events, calls back to back (no sync in between)."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def profiled(fn, iters: int, path: Path) -> dict:
    """Kernel time (sum of device kernels) and wall time of ``iters`` calls under the profiler; the
    top kernels go to ``path``."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - t0
    events = prof.key_averages()
    path.write_text(events.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=80))
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"wall_ms_per_call": wall_s * 1e3 / iters, "kernel_ms_per_call": kernel_us / 1e3 / iters}


def section_decode(model: Llama, args, out: Path) -> dict:
    dev = next(model.parameters()).device
    b, ctx = args.batch, args.context
    blocks = b * blocks_needed(ctx + 512, BLOCK) + 4
    cache = KVCache(model.config, blocks, BLOCK, dtype=torch.bfloat16, device=dev)
    for layer in range(cache.k.shape[0]):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    rank = KVPRank(model, cache, 0, 1)
    ids = []
    for i in range(b):
        table = cache.allocator.allocate(blocks_needed(ctx + 512, BLOCK))
        rank.reserve(f"r{i}", 1, table, 0, ctx)
        rank.shards[f"r{i}"].length = ctx
        ids.append(f"r{i}")
    pos = [ctx] * b

    def entries():
        e = [StepEntry(rid, 1000 + i, pos[i], 0) for i, rid in enumerate(ids)]
        for i in range(b):
            pos[i] += 1
        return e

    def step():
        return rank.step(entries(), group_wide=False)

    params = [SamplingParams(max_tokens=1 << 20, ignore_eos=True)] * b

    def loop_step():  # what DecodeWorker._step does on the device path
        logits = step()
        gens = [p.generator(0) for p in params]
        return sample_batch(logits, params, gens).tolist()

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * cache.k.element_size()
    kv = b * ctx * kv_per_token
    r = {"batch": b, "context": ctx, "floor_ms": (weights + kv) / args.hbm_gbps / 1e6}
    r["step_device_ms"] = device_s(step, args.iters) * 1e3
    r["step_wall_ms_p50"] = statistics.median(wall(step, args.iters)) * 1e3
    r["loop_wall_ms_p50"] = statistics.median(wall(loop_step, args.iters)) * 1e3
    logits = step()
    r["sample_wall_ms_p50"] = (
        statistics.median(
            wall(lambda: sample_batch(logits, params, [p.generator(0) for p in params]).tolist(), args.iters)
        )
        * 1e3
    )
    r["profile_step"] = profiled(step, 10, out / "decode_step_kernels.txt")
    r["profile_loop"] = profiled(loop_step, 10, out / "decode_loop_kernels.txt")
    log(f"decode: {r}")
    return r


def section_prefill(model: Llama, args, out: Path) -> dict:
    dev = next(model.parameters()).device
    p, k = args.prompt, args.chunk
    cache = KVCache(model.config, blocks_needed(p, BLOCK) * 2 + 8, BLOCK, dtype=torch.bfloat16, device=dev)
    runner = CPRunner(model, cache, strategy="pass_kv")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (p,), generator=torch.Generator().manual_seed(0)).tolist()

    def run(chunks: list[int], timer: list | None = None) -> None:
        seq = CPSequence()
        done = 0
        try:
            for n in chunks:
                t0 = time.perf_counter()
                runner.prefill([seq], [ids[done : done + n]])
                torch.cuda.synchronize()
                if timer is not None:
                    timer.append((n, done, time.perf_counter() - t0))
                done += n
        finally:
            cache.allocator.free(seq.block_table)

    chunks = [k] * (p // k) + ([p % k] if p % k else [])
    run([p])
    run(chunks)
    one = [wall_one(lambda: run([p])) for _ in range(2)]
    passes: list = []
    t0 = time.perf_counter()
    run(chunks, passes)
    chunked = time.perf_counter() - t0
    r = {"prompt": p, "chunk": k, "one_pass_s": min(one), "chunked_s": chunked, "passes": len(chunks)}
    r["chunk_passes"] = [{"new": n, "before": d, "s": s} for n, d, s in passes]
    log(f"prefill: one pass {min(one):.3f} s, {len(chunks)} chunks of {k}: {chunked:.3f} s ({chunked / min(one):.2f}x)")
    with ring_path():
        r["ring_small_pass_128_wall_ms_p50"] = statistics.median(wall(lambda: run([128]), 20)) * 1e3
        run(chunks)
        t0 = time.perf_counter()
        run(chunks)
        r["ring_chunked_s"] = time.perf_counter() - t0
    seq = CPSequence()
    runner.prefill([seq], [ids[: p - k]])
    torch.cuda.synchronize()

    def late_chunk():
        runner.prefill([CPSequence(list(seq.block_table), seq.num_cached_local, seq.num_done)], [ids[p - k :]])

    r["profile_late_chunk"] = profiled(late_chunk, 3, out / "prefill_late_chunk_kernels.txt")

    def small():
        run([128])

    r["small_pass_128_wall_ms_p50"] = statistics.median(wall(small, 20)) * 1e3
    r["profile_small_pass_128"] = profiled(small, 10, out / "prefill_small_pass_kernels.txt")
    log(f"prefill: small pass {r['small_pass_128_wall_ms_p50']:.1f} ms, chunked {chunked:.3f} s "
        f"(ring path {r['ring_small_pass_128_wall_ms_p50']:.1f} ms, {r['ring_chunked_s']:.3f} s)")  # fmt: skip
    return r


@contextlib.contextmanager
def ring_path():
    """CP = 1 passes through the ring code (pieces, packed KV buffer, merges) instead of one
    attention per sequence: the A/B of that shortcut in ``RingAttention``."""
    from ringserve.prefill_service import context_parallel as cp

    def ring_only(self, layer, q, k, v):
        self.cache.write(layer, self.slots, k, v)
        kv = [self.cache.read(layer, t, n) for t, n in zip(self.tables, self.lengths)]
        return self.ring(q, [k for k, _ in kv], [v for _, v in kv], self.layout, self.comm)

    saved = cp.RingAttention.__call__
    cp.RingAttention.__call__ = ring_only
    try:
        yield
    finally:
        cp.RingAttention.__call__ = saved


def wall_one(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "/tmp/profile"))
    ap.add_argument("--sections", default="decode,prefill")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=96)  # the 64-in / 256-out sweep's mean context
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--hbm-gbps", type=float, default=4270.0)
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29511", rank=0, world_size=1)
    torch.cuda.set_device(0)
    model = Llama.random(ModelConfig.from_hf(LLAMA3_8B), torch.bfloat16, torch.device("cuda", 0), 0)
    r = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(0)}
    for name, fn in (("decode", section_decode), ("prefill", section_prefill)):
        if name in args.sections.split(","):
            r[name] = fn(model, args, out)
            torch.cuda.empty_cache()
            (out / "profile.json").write_text(json.dumps(r, indent=1))
    print(json.dumps(r, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
