"""Check and time KV-parallel decode on GPUs: a Llama-3-8B-shaped model with random bf16 weights.

    torchrun --nproc-per-node 2 bench/kvp_gpu.py --out $OUT/kvp.json

Sections, in order:

hbm      Measured HBM bandwidth on one GPU: a device-to-device copy ((read + write) / time) and a
         reduction (read / time); the higher is the floor's bandwidth.
check    The Triton paged decode kernel against ``attend`` in float32 (bf16 inputs, GQA 32:8,
         d = 128, uneven lengths, empty sequences); then K = 2 against K = 1 on the same weights
         and the same KV split over the two GPUs: last-layer logits max |diff| and argmax.
kernel   One layer's decode attention at 32K..512K tokens, batch 1 and 8, on one GPU: the Triton
         paged kernel (reads blocks where they lie), the gather path (``KVCache.read`` + cuDNN),
         and cuDNN SDPA over KV already contiguous (no paging: the ideal single kernel). GB/s of
         KV read per second.
decode   Time per decode step (every request gets one token) of ``KVPRank.step``, the serving
         code, for K = 1 (each GPU on its own, rank 0 reported) and K = 2 (both GPUs, NCCL),
         contexts 8K..1M, batch 1 and 8, beside the floor: (weights + this rank's KV) bytes /
         measured bandwidth. Configurations that do not fit in memory are listed as such.

Times: warm-up steps, then a fixed number of steps between CUDA events, identical on both ranks
(never do_bench: ranks must issue the same collectives). A K = 2 time is rank 0's; ranks run in
lock-step through the all-gathers.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast must stay off on these hosts
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from shapes import LLAMA3_8B  # noqa: E402

from ringserve.decode_service.kvp import KVPRank, StepEntry  # noqa: E402
from ringserve.engine.attention import attend  # noqa: E402
from ringserve.engine.config import ModelConfig  # noqa: E402
from ringserve.engine.kv_cache import BlockAllocator, KVCache, blocks_needed  # noqa: E402
from ringserve.engine.model import Llama  # noqa: E402
from ringserve.engine.paged_decode import DecodeBatch, decode_attention, paged_decode_kernel  # noqa: E402
from ringserve.kv_transfer.plan import balanced_shares  # noqa: E402

BLOCK = 64
K_TOKEN = 1024


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def random_model(device: torch.device, seed: int = 0) -> Llama:
    """The 8B shape with random bf16 weights, the same on every rank."""
    return Llama.random(ModelConfig.from_hf(LLAMA3_8B), torch.bfloat16, device, seed)


def timed(fn, iters: int, warmup: int = 2, barrier: bool = True) -> float:
    """Seconds per call: warm-up, then ``iters`` calls between CUDA events (same count on every
    rank; ``barrier=False`` for what one rank times alone)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if barrier and dist.get_world_size() > 1:
        dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def hbm_bandwidth(device: torch.device) -> dict:
    x = torch.empty(4 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy_s = timed(lambda: y.copy_(x), 10)
    xs = x.view(torch.bfloat16)
    sum_s = timed(lambda: xs.sum(dtype=torch.float32), 10)
    return {"copy_gbps": 2 * (4 << 30) / copy_s / 1e9, "read_gbps": (4 << 30) / sum_s / 1e9}


def fill_random(cache: KVCache, upto_blocks: int) -> None:
    """Random KV in the first blocks (torch.empty may hold NaNs that would poison the softmax)."""
    for layer in range(cache.k.shape[0]):
        cache.k[layer, :upto_blocks].normal_()
        cache.v[layer, :upto_blocks].normal_()


def check_kernel(device: torch.device) -> dict:
    torch.manual_seed(0)
    k = torch.randn(300, BLOCK, 8, 128, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    q = torch.randn(4, 32, 128, dtype=torch.bfloat16, device=device)
    lengths = [1, 0, 70 * BLOCK + 5, 4000]
    tables = torch.stack([torch.randperm(300, device=device)[:80] for _ in lengths]).int()
    out, lse = paged_decode_kernel(q, k, v, tables, torch.tensor(lengths, dtype=torch.int32, device=device))
    worst_out = worst_lse = 0.0
    for b, n in enumerate(lengths):
        rows = tables[b].long()
        kk, vv = k[rows].flatten(0, 1)[:n].float(), v[rows].flatten(0, 1)[:n].float()
        ro, rl = attend(q[b : b + 1].float(), kk, vv, causal=False)
        worst_out = max(worst_out, (out[b].float() - ro[0]).abs().max().item())
        if n:
            worst_lse = max(worst_lse, (lse[b] - rl[0]).abs().max().item())
    return {"kernel_max_abs_out": worst_out, "kernel_max_abs_lse": worst_lse}


def setup_requests(rank: KVPRank, contexts: list[int], world: int) -> list[str]:
    """Reserve requests of the given lengths as the worker would (balanced shares over ``world``
    ranks, room for 64 generated tokens), their prompt KV taken as landed (whatever the cache holds)."""
    rank.shards.clear()
    rank.cache.allocator = BlockAllocator(rank.cache.allocator.num_blocks)
    ids = []
    for i, n in enumerate(contexts):
        rid = f"r{i}"
        rows = balanced_shares(n + 64, world)[rank.rank]
        table = rank.cache.allocator.allocate(blocks_needed(rows, BLOCK))
        share = balanced_shares(n, world)
        rank.reserve(rid, 1, table, sum(share[: rank.rank]), share[rank.rank])
        rank.shards[rid].length = share[rank.rank]
        ids.append(rid)
    return ids


def check_kvp(model: Llama, rank_id: int, world: int, device: torch.device) -> dict:
    """K = world against K = 1 on the same random KV: each rank stores its share of it."""
    contexts = [3000, 17]
    g = torch.Generator(device=device).manual_seed(1)
    layers = model.config.num_hidden_layers
    full = [torch.randn(layers, 2, n, 8, 128, generator=g, device=device).bfloat16() for n in contexts]

    def load(k: int) -> tuple[KVPRank, list[str]]:
        blocks = 2 * sum(blocks_needed(n + 64, BLOCK) for n in contexts)
        cache = KVCache(model.config, blocks, BLOCK, dtype=torch.bfloat16, device=device)
        kvp = KVPRank(model, cache, rank_id if k > 1 else 0, k)
        ids = setup_requests(kvp, contexts, k)
        for rid, kv in zip(ids, full):
            s = kvp.shards[rid]
            slots = cache.slots(s.block_table, 0, s.prompt_len)
            rows = slice(s.prompt_start, s.prompt_start + s.prompt_len)
            for layer in range(layers):
                cache.write(layer, slots, kv[layer, 0, rows], kv[layer, 1, rows])
        return kvp, ids

    kvp, ids = load(world)
    logits_k = kvp.step(make_step(ids, contexts, world)(), group_wide=world > 1)
    out = {}
    if rank_id == 0:
        solo, ids1 = load(1)
        logits_1 = solo.step(make_step(ids1, contexts, 1)(), group_wide=False)
        out = {
            f"kvp{world}_vs_kvp1_logits_max_abs": (logits_k - logits_1).abs().max().item(),
            f"kvp{world}_vs_kvp1_logits_max": logits_1.abs().max().item(),
            f"kvp{world}_vs_kvp1_argmax_equal": bool(torch.equal(logits_k.argmax(-1), logits_1.argmax(-1))),
        }
    dist.barrier()
    return out


def make_step(ids: list[str], contexts: list[int], world: int):
    """A step function that decodes one token per request, owners chosen as the worker does."""
    rows = [dict(enumerate(balanced_shares(n, world))) for n in contexts]
    pos = list(contexts)

    def entries() -> list[StepEntry]:
        out = []
        for i, rid in enumerate(ids):
            owner = min(rows[i], key=lambda r: (rows[i][r], r))
            rows[i][owner] += 1
            out.append(StepEntry(rid, 1000 + i, pos[i], owner))
            pos[i] += 1
        return out

    return entries


def kv_bytes_per_token(config: ModelConfig) -> int:
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--contexts", default="8K,32K,128K,512K,1024K", help="tokens, or K = 1024 tokens")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--sections", default="hbm,check,kernel,decode")
    p.add_argument("--kv-gib", type=float, default=None, help="KV pool per GPU (default: all free memory but 6 GiB)")
    p.add_argument("--hang-s", type=float, default=300, help="dump stacks and fail a collective stuck this long")
    args = p.parse_args()
    faulthandler.dump_traceback_later(args.hang_s, exit=True)  # a hung rank says where, then exits
    dist.init_process_group("nccl", timeout=timedelta(seconds=args.hang_s))
    rank_id, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank_id)
    torch.cuda.set_device(device)
    sections = args.sections.split(",")
    contexts = [int(c[:-1]) * K_TOKEN if c.endswith("K") else int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {"device": torch.cuda.get_device_name(device), "world": world, "torch": torch.__version__}

    def save() -> None:
        if rank_id == 0 and args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    if "hbm" in sections:
        results["hbm"] = hbm_bandwidth(device)
        log(f"HBM: {results['hbm']}")
        save()
    bandwidth = max(results.get("hbm", {"read_gbps": 4300.0}).values()) * 1e9

    log("building the 8B-shaped model with random weights")
    model = random_model(device)
    config = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = kv_bytes_per_token(config)
    if "check" in sections:
        results["check"] = {**check_kernel(device), **check_kvp(model, rank_id, world, device)}
        log(f"check: {results['check']}")
        save()

    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0]
    pool = min(free - (6 << 30), int(args.kv_gib * 2**30)) if args.kv_gib else free - (6 << 30)  # 6 GiB: activations
    num_blocks = int(pool // (per_token * BLOCK))
    cache = KVCache(config, num_blocks, BLOCK, dtype=torch.bfloat16, device=device)
    fill_random(cache, num_blocks)
    capacity = num_blocks * BLOCK
    results.update(weight_bytes=weight_bytes, kv_bytes_per_token=per_token, cache_tokens_per_gpu=capacity)
    log(f"weights {weight_bytes / 2**30:.1f} GiB; KV cache {capacity} tokens per GPU")

    if "kernel" in sections and rank_id == 0:
        rows = []
        q1 = torch.randn(8, 32, 128, dtype=torch.bfloat16, device=device)
        for ctx in contexts:
            for b in batches:
                if ctx * b > min(capacity, K_TOKEN * K_TOKEN):  # the contiguous copy needs room too
                    continue
                per_seq = blocks_needed(ctx, BLOCK)
                tables = torch.arange(b * per_seq, device=device, dtype=torch.int32).view(b, per_seq)
                batch = DecodeBatch.build(tables, [ctx] * b)
                q = q1[:b]
                paged = timed(lambda q=q, batch=batch: decode_attention(cache, 0, q, batch), args.iters, barrier=False)
                gather = timed(
                    lambda q=q, t=tables, n=ctx: [
                        attend(q[i : i + 1], *cache.read(0, t[i], n), causal=False) for i in range(len(q))
                    ],
                    max(2, args.iters // 4),
                    barrier=False,
                )
                # The same KV, contiguous in SDPA's [B, Hkv, T, D] layout.
                kc = cache.k[0].view(-1, 8, 128)[: ctx * b].view(b, ctx, 8, 128).transpose(1, 2).contiguous()
                vc = cache.v[0].view(-1, 8, 128)[: ctx * b].view(b, ctx, 8, 128).transpose(1, 2).contiguous()
                qs = q.unsqueeze(2)  # [B, H, 1, D]
                sdpa = timed(
                    lambda qs=qs, kc=kc, vc=vc: torch.nn.functional.scaled_dot_product_attention(
                        qs, kc, vc, enable_gqa=True
                    ),
                    args.iters,
                    barrier=False,
                )
                del kc, vc
                kv = ctx * b * 2 * 8 * 128 * 2
                rows.append(
                    dict(
                        context=ctx,
                        batch=b,
                        triton_paged_us=paged * 1e6,
                        gather_attend_us=gather * 1e6,
                        sdpa_contiguous_us=sdpa * 1e6,
                        triton_gbps=kv / paged / 1e9,
                        sdpa_gbps=kv / sdpa / 1e9,
                    )
                )
                log(f"kernel {rows[-1]}")
        results["kernel"] = rows
        save()
    dist.barrier()

    if "decode" in sections:
        rows = []
        modes = [(k, True) for k in sorted({1, world})] + [(world, False)]  # last: eager, no CUDA graphs
        for k, graphs in modes:
            kvp = KVPRank(model, cache, rank_id if k > 1 else 0, k, use_graphs=graphs)
            for ctx in contexts if graphs else contexts[:3]:
                for b in batches:
                    need = max(balanced_shares(ctx + 64, k)) * b
                    row = dict(kvp=k, graphs=graphs, context=ctx, batch=b)
                    if need > capacity:
                        row["fits"] = False
                        rows.append(row)
                        continue
                    ids = setup_requests(kvp, [ctx] * b, k)
                    step = make_step(ids, [ctx] * b, k)
                    t = timed(lambda kvp=kvp, step=step, k=k: kvp.step(step(), group_wide=k > 1), args.iters)
                    local_kv = sum(kvp.shards[r].length for r in ids) * per_token
                    floor = (weight_bytes + local_kv) / bandwidth
                    row.update(fits=True, step_ms=t * 1e3, floor_ms=floor * 1e3, vs_floor=t / floor)
                    rows.append(row)
                    log(f"decode {row}")
                    save()
        results["decode"] = rows
        save()
        if rank_id == 0:
            print(f"{'K':>2} {'mode':>6} {'context':>8} {'batch':>5} {'step ms':>9} {'floor ms':>9} {'x floor':>8}")
            for r in rows:
                mode = "graph" if r["graphs"] else "eager"
                ctx = f"{r['context'] // K_TOKEN}K" if r["context"] >= K_TOKEN else str(r["context"])
                head = f"{r['kvp']:>2} {mode:>6} {ctx:>8} {r['batch']:>5}"
                if r["fits"]:
                    print(f"{head} {r['step_ms']:>9.2f} {r['floor_ms']:>9.2f} {r['vs_floor']:>8.2f}")
                else:
                    print(f"{head}  does not fit")
    # No destroy_process_group: with NCCL kernels captured in CUDA graphs it hung in torch 2.11.


if __name__ == "__main__":
    main()
