"""Moving one request's KV between two GPUs of one host: NIXL VRAM->VRAM vs NCCL vs a torch copy.

Two processes, rank 0 on cuda:0 (the prefill side) and rank 1 on cuda:1 (the decode side), each
with a paged KVCache of a Llama-3-8B shape (32 layers, 8 KV heads, head dim 128, bf16) holding
one request of ``--tokens`` tokens (128K: 16 GiB per side):

- ``nixl-contiguous`` / ``nixl-fragmented``: rank 0 ``NixlEndpoint.push``-es every row into rank
  1's reserved blocks (both pools registered as VRAM), timed until push returns (NIXL reports
  the WRITE complete). Contiguous block tables coalesce into one descriptor per layer and K/V
  (64 in all); fragmented (shuffled) ones cost one descriptor per block, layer and K/V;
- ``nccl``: ``dist.send`` / ``dist.recv`` of the same bytes (the K and V pools, one message each),
  timed on both ranks after a barrier and a synchronize; the slower rank counts;
- ``copy``: in rank 0, ``dst.copy_(src)`` from cuda:0 to a buffer on cuda:1 (peer copy).

Fixed iteration counts on every rank (``--warmup``, ``--iters``; never a self-tuning timer: the
ranks' collectives must match), median reported. NIXL's result is checked bit for bit layer by
layer (rank 1 sends its rows to rank 0 over NCCL). If NIXL does not import or fails, the NCCL
and copy baselines still run and the table says why NIXL is missing.

    torchrun --nproc-per-node 2 bench/kv_transfer_gpu.py [--tokens 131072] [--block-size 64]
    python bench/kv_transfer_gpu.py ...   (spawns the two ranks itself)

Prints a table; writes every number to $OUT/kv_transfer_gpu.json when $OUT is set (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from ringserve.engine.config import ModelConfig
from ringserve.engine.kv_cache import KVCache

LAYERS, HEADS, DIM, DTYPE = 32, 8, 128, torch.bfloat16


def log(msg: str) -> None:
    print(f"[rank {dist.get_rank() if dist.is_initialized() else '?'}] {msg}", file=sys.stderr, flush=True)


def make_cache(tokens: int, block_size: int, device: torch.device) -> KVCache:
    config = ModelConfig(
        vocab_size=1,
        hidden_size=HEADS * DIM,
        intermediate_size=1,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=DIM,
    )
    return KVCache(config, tokens // block_size, block_size, dtype=DTYPE, device=device)


def block_table(num_blocks: int, layout: str, seed: int) -> list[int]:
    if layout == "contiguous":
        return list(range(num_blocks))
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int, iters: int, ctrl) -> list[float]:
    """Seconds per call on this rank: barrier, synchronize, call, synchronize."""
    times = []
    for i in range(warmup + iters):
        dist.barrier(group=ctrl)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def slowest(times: list[float], ctrl) -> list[float]:
    """Per iteration, the slower rank's time (every rank gets the same list)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, times, group=ctrl)
    return [max(ts) for ts in zip(*everyone)]


def bench_nixl(args, cache: KVCache, layout: str, ctrl, rank: int) -> dict:
    """One NIXL layout; every rank returns the same result dict."""
    from ringserve.kv_transfer.nixl import NixlEndpoint

    if rank == 1:  # so that the check below sees only what NIXL wrote
        cache.k.zero_()
        cache.v.zero_()
    landed = threading.Semaphore(0)  # one release per WRITE notification
    endpoint = NixlEndpoint(cache, on_landed=lambda note: landed.release())
    table = block_table(args.tokens // args.block_size, layout, seed=rank + 1)
    box = [endpoint.landing("bench", 1, table, args.tokens) if rank == 1 else None]
    dist.broadcast_object_list(box, src=1, group=ctrl)
    pushes = [0]

    def push():
        if rank == 0:
            endpoint.push(table, 0, args.tokens, box[0], 0, transfer_id=str(pushes[0]), timeout_s=300)
            pushes[0] += 1

    times = timed(push, args.warmup, args.iters, ctrl)
    if rank == 1:
        for _ in range(args.warmup + args.iters):
            assert landed.acquire(timeout=60), "a NIXL notification did not arrive"
    identical = check_rows(cache, table, args.tokens, rank)
    endpoint.close()
    return {"times": slowest(times, ctrl), "bit_identical": identical}


def check_rows(cache: KVCache, table: list[int], tokens: int, rank: int) -> bool:
    """Rank 1 sends its rows layer by layer; rank 0 compares them with its own (both get the answer)."""
    same = torch.ones((), dtype=torch.int32, device=cache.k.device)
    for layer in range(LAYERS):
        k, v = cache.read(layer, table, tokens)
        rows = torch.stack([k, v]).contiguous()
        if rank == 1:
            dist.send(rows, dst=0)
        else:
            theirs = torch.empty_like(rows)
            dist.recv(theirs, src=1)
            same &= torch.equal(rows.view(torch.int16), theirs.view(torch.int16))
    dist.broadcast(same, src=0)
    return bool(same.item())


def run(args) -> None:
    rank = int(os.environ["RANK"])
    timeout = datetime.timedelta(seconds=600)
    if args.smoke:  # the same code on CPU: gloo for NCCL, DRAM for VRAM
        device = other = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        other = torch.device("cuda", 1)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    ctrl = dist.new_group(backend="gloo")
    nbytes = 2 * LAYERS * args.tokens * HEADS * DIM * DTYPE.itemsize
    results: dict = {
        "device": "CPU (smoke run, gloo)" if args.smoke else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "tokens": args.tokens,
        "block_size": args.block_size,
        "bytes": nbytes,
        "warmup": args.warmup,
        "iters": args.iters,
        "methods": {},
    }
    cache = make_cache(args.tokens, args.block_size, device)
    if rank == 0:
        cache.k.normal_()
        cache.v.normal_()
    else:
        cache.k.zero_()
        cache.v.zero_()

    # NIXL (if it loads here); a failure is recorded, never fatal to the baselines.
    why_not = None
    try:
        from ringserve.kv_transfer.nixl import available

        why_not = available()
    except Exception as e:  # report anything, then run the baselines
        why_not = f"{type(e).__name__}: {e}"
    results["nixl_missing"] = why_not
    if why_not is None:
        for layout in args.layouts.split(","):
            name = f"nixl-{layout}"
            try:
                results["methods"][name] = bench_nixl(args, cache, layout, ctrl, rank)
            except Exception as e:  # recorded in the table; the baselines still run
                results["methods"][name] = {"error": f"{type(e).__name__}: {e}"}
                log(traceback.format_exc())
            dist.barrier(group=ctrl)
    else:
        log(f"NIXL is missing: {why_not}; running the NCCL and copy baselines only")

    def nccl():
        for t in (cache.k, cache.v):
            if rank == 0:
                dist.send(t, dst=1)
            else:
                dist.recv(t, src=0)

    results["methods"]["nccl"] = {"times": slowest(timed(nccl, args.warmup, args.iters, ctrl), ctrl)}

    # torch copy cuda:0 -> cuda:1 inside rank 0 (rank 1 only joins the barriers).
    copies = [torch.empty_like(t, device=other) for t in (cache.k, cache.v)] if rank == 0 else []

    def copy():
        for src, dst in zip((cache.k, cache.v), copies):
            dst.copy_(src)
        if copies and other.type == "cuda":
            torch.cuda.synchronize(other)

    times = slowest(timed(copy, args.warmup, args.iters, ctrl), ctrl)
    same = all(
        torch.equal(src.to(other).view(torch.int16), dst.view(torch.int16))
        for src, dst in zip((cache.k, cache.v), copies)
    )
    results["methods"]["copy"] = {"times": times, "bit_identical": same if rank == 0 else None}
    copies.clear()

    if rank == 0:
        report(results, args.out or (os.environ.get("OUT") and os.path.join(os.environ["OUT"], "kv_transfer_gpu.json")))
    dist.destroy_process_group()


def report(results: dict, out: str | None) -> None:
    nbytes = results["bytes"]
    nccl = statistics.median(results["methods"]["nccl"]["times"])
    print(
        f"\n{results['device']}, {results['tokens']} tokens, 8B-shaped bf16 KV, {nbytes / 2**30:.2f} GiB, "
        f"block {results['block_size']}, {results['iters']} timed iterations (median)"
    )
    if results["nixl_missing"]:
        print(f"NIXL missing: {results['nixl_missing']}")
    print("| method | seconds | GB/s | vs NCCL | bit-identical |")
    print("|---|---:|---:|---:|---|")
    for name, r in results["methods"].items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} | | | |")
            continue
        s = statistics.median(r["times"])
        r["seconds"], r["gb_per_s"], r["vs_nccl"] = s, nbytes / s / 1e9, nccl / s
        print(f"| {name} | {s:.4f} | {r['gb_per_s']:.1f} | {r['vs_nccl']:.2f} | {r.get('bit_identical', '-')} |")
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {out}")


def _spawned(rank: int, port: int, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    run(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--layouts", default="contiguous,fragmented", help="NIXL block tables to measure")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", help="JSON file (default: $OUT/kv_transfer_gpu.json when $OUT is set)")
    ap.add_argument("--smoke", action="store_true", help="run on CPU with gloo: checks the script, measures nothing")
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on the shared machines
    if "RANK" in os.environ:
        run(args)
    else:
        import socket

        import torch.multiprocessing as tmp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tmp.spawn(_spawned, args=(port, args), nprocs=2)


if __name__ == "__main__":
    main()
