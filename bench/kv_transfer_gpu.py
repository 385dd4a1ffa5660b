"""Moving one request's KV between two processes' paged caches on GPU: NIXL VRAM->VRAM vs NCCL or a device copy.

Two processes, rank 0 (the prefill side) and rank 1 (the decode side), each with a paged KVCache
of a Llama-3-8B shape (32 layers, 8 KV heads, head dim 128, bf16) of ``--pool-factor`` times the
blocks of one request of ``--tokens`` tokens (128K: 16 GiB). With two GPUs rank r is on cuda:r;
with one, both are on cuda:0 (both tiers on one GPU, as the served path of issue 15 runs).

- ``nixl-<layout>``: rank 0 ``NixlEndpoint.push``-es every row of the request into rank 1's
  reserved blocks (both pools registered as VRAM), timed until push returns (NIXL reports the
  WRITE complete). Block tables on both sides: ``contiguous`` (a fresh pool: one descriptor per
  layer and K/V, 64 in all), ``shuffled`` (blocks drawn at random from the pool: about one
  descriptor per block, layer and K/V) or ``mixed`` (what the allocator hands the request after
  a seeded mixed load of each pool, bench/fragment.py); the descriptors posted are reported;
- ``heads-<case>`` (``--head-tokens`` tokens, fresh pools): a TP rank's piece of the rows.
  ``whole``: 8 heads into 8 (whole rows); ``src-strided``: heads 4..7 of an 8-head pool into a
  4-head pool (prefill TP 1 -> decode TP 2: gathered into the staging buffer, then WRITEs of
  whole rows); ``dst-strided``: a 4-head pool into heads 4..7 of an 8-head pool (TP 2 -> TP 1:
  packed, then pulled: WRITEs into the decode side's staging buffer, which stores them);
  ``both-strided``: heads 4..7 of an 8-head pool into heads 0..3 of another (packed and pulled);
- ``nccl-<bytes>`` (two GPUs): ``dist.send`` / ``dist.recv`` of the same bytes (one contiguous
  buffer), timed on both ranks after a barrier and a synchronize; the slower rank counts;
- ``copy-<bytes>``: in rank 0, ``dst.copy_(src)`` of the same bytes from its GPU to the other
  (one GPU: within it, a read and a write of HBM per byte).

Fixed iteration counts on every rank (``--warmup``, ``--iters``; never a self-tuning timer: the
ranks' collectives must match), median reported. Every NIXL move is checked: both ranks
checksum the moved heads of their rows layer by layer. If NIXL does not import or fails, the
baselines still run and the table says why NIXL is missing.

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
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fragment import mixed_load_table  # noqa: E402

from ringserve.engine.config import ModelConfig  # noqa: E402
from ringserve.engine.kv_cache import KVCache, as_runs  # noqa: E402

LAYERS, HEADS, DIM, DTYPE = 32, 8, 128, torch.bfloat16
# (name, source heads, destination heads, source head range, destination head range)
HEAD_CASES = [
    ("whole", 8, 8, None, None),
    ("src-strided", 8, 4, range(4, 8), None),
    ("dst-strided", 4, 8, None, range(4, 8)),
    ("both-strided", 8, 8, range(4, 8), range(0, 4)),
]


def log(msg: str) -> None:
    print(f"[rank {dist.get_rank() if dist.is_initialized() else '?'}] {msg}", file=sys.stderr, flush=True)


def make_cache(num_blocks: int, block_size: int, device: torch.device, heads: int = HEADS) -> KVCache:
    config = ModelConfig(
        vocab_size=1,
        hidden_size=heads * DIM,
        intermediate_size=1,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=DIM,
    )
    return KVCache(config, num_blocks, block_size, dtype=DTYPE, device=device)


def block_table(pool_blocks: int, request_blocks: int, layout: str, seed: int) -> list[int]:
    """The request's blocks in a pool of ``pool_blocks``, as ``layout`` says."""
    if layout == "contiguous":
        return list(range(request_blocks))
    if layout == "shuffled":
        return torch.randperm(pool_blocks, generator=torch.Generator().manual_seed(seed))[:request_blocks].tolist()
    if layout == "mixed":
        return mixed_load_table(pool_blocks, request_blocks, seed)
    raise ValueError(f"unknown layout {layout!r}")


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


def bench_push(args, cache: KVCache, tables: list[list[int]], tokens: int, heads: tuple, ctrl, rank: int) -> dict:
    """NIXL pushes of ``tokens`` rows from rank 0's ``tables[0]`` into rank 1's ``tables[1]``
    (``heads``: source and destination head ranges, None: all); every rank returns the result."""
    from ringserve.kv_transfer.nixl import NixlEndpoint

    if rank == 1:  # so that the check below sees only what NIXL wrote
        cache.k.zero_()
        cache.v.zero_()
    landed = threading.Semaphore(0)  # one release per WRITE notification
    endpoint = NixlEndpoint(cache, on_landed=lambda note: landed.release())
    box = [endpoint.landing("bench", 1, tables[1], tokens) if rank == 1 else None]
    dist.broadcast_object_list(box, src=1, group=ctrl)
    sent = [0]

    def push():
        if rank == 0:
            sent[0] = endpoint.push(tables[0], 0, tokens, box[0], 0, f"t{time.monotonic_ns()}", 300, *heads)

    times = timed(push, args.warmup, args.iters, ctrl)
    dist.barrier(group=ctrl)  # rank 0's last push is done: its notification is on the way
    notes = 0
    if rank == 1:  # every notification arrives (a staged push sends one per chunk)
        while landed.acquire(timeout=1):  # they come within milliseconds of the last push
            notes += 1
    pushes = args.warmup + args.iters
    counts: list = [None, None]  # per rank, per push: descriptors posted (rank 0's WRITEs), notifications
    dist.all_gather_object(counts, (endpoint.descriptors_posted / pushes, notes / pushes, sent[0]), group=ctrl)
    identical = check_rows(cache, tables, tokens, heads, ctrl, rank)
    endpoint.close()
    return {
        "times": slowest(times, ctrl),
        "bytes": counts[0][2],
        "bit_identical": identical,
        "descriptors": counts[0][0] + counts[1][0],
        "notifications": counts[1][1],
        "runs": [len(as_runs(t)) for t in tables],
    }


def check_rows(cache: KVCache, tables: list[list[int]], tokens: int, heads: tuple, ctrl, rank: int) -> bool:
    """Both ranks checksum the moved heads of their rows, layer by layer (the bits as int16, summed
    plain and position-weighted in int64, on the device); equal checksums on both sides."""
    mine = []
    for layer in range(LAYERS):
        rows = torch.stack(cache.read(layer, tables[rank], tokens))  # [K/V, tokens, heads, D]
        part = heads[rank] if heads[rank] is not None else range(rows.shape[2])
        bits = rows[:, :, part.start : part.stop].contiguous().view(torch.int16).flatten().to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
        mine.append((int(bits.sum()), int((bits * weights).sum())))
    both: list = [None, None]
    dist.all_gather_object(both, mine, group=ctrl)
    return both[0] == both[1]


def bench_nccl(args, nbytes: int, device, ctrl, rank: int) -> dict:
    """NCCL send/recv of ``nbytes`` (one contiguous buffer)."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def nccl():
        if rank == 0:
            dist.send(buf, dst=1)
        else:
            dist.recv(buf, src=0)

    return {"times": slowest(timed(nccl, args.warmup, args.iters, ctrl), ctrl), "bytes": nbytes}


def bench_copy(args, nbytes: int, device, other, ctrl, rank: int) -> dict:
    """torch copy of ``nbytes`` from cuda:0 to cuda:1 inside rank 0 (rank 1 only joins the barriers)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device) if rank == 0 else None
    dst = torch.empty(nbytes, dtype=torch.uint8, device=other) if rank == 0 else None

    def copy():
        if rank == 0:
            dst.copy_(src)
            if other.type == "cuda":
                torch.cuda.synchronize(other)

    times = slowest(timed(copy, args.warmup, args.iters, ctrl), ctrl)
    same = torch.equal(src.to(other), dst) if rank == 0 else None
    return {"times": times, "bit_identical": same, "bytes": nbytes}


def attempt(results: dict, name: str, args, cache: KVCache, tables, tokens: int, heads: tuple, ctrl, rank: int) -> None:
    """One NIXL measurement; a failure is recorded in the table, never fatal to the rest."""
    try:
        r = results["methods"][name] = bench_push(args, cache, tables, tokens, heads, ctrl, rank)
        s = statistics.median(r["times"])
        log(
            f"{name}: {s:.4f} s, {r['bytes'] / s / 1e9:.1f} GB/s, {r['descriptors']:.0f} descriptors, "
            f"exact={r['bit_identical']}"
        )
    except Exception as e:
        results["methods"][name] = {"error": f"{type(e).__name__}: {e}"}
        log(traceback.format_exc())
    dist.barrier(group=ctrl)


def run(args) -> None:
    rank = int(os.environ["RANK"])
    timeout = datetime.timedelta(seconds=600)
    two_gpus = not args.smoke and torch.cuda.device_count() >= 2
    if args.smoke:  # the same code on CPU: gloo for NCCL, DRAM for VRAM
        device = other = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    elif two_gpus:
        device, other = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))), torch.device("cuda", 1)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:  # one GPU, both tiers on it (as issue 15's served path): no NCCL between two ranks of one GPU
        device = other = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("gloo", timeout=timeout)
    ctrl = dist.new_group(backend="gloo")
    row_bytes = 2 * LAYERS * HEADS * DIM * DTYPE.itemsize  # K and V of one token, every layer
    nbytes = args.tokens * row_bytes
    request_blocks = args.tokens // args.block_size
    pool_blocks = args.pool_factor * request_blocks
    results: dict = {
        "device": "CPU (smoke run, gloo)"
        if args.smoke
        else f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}",
        "torch": torch.__version__,
        "tokens": args.tokens,
        "block_size": args.block_size,
        "pool_blocks": pool_blocks,
        "bytes": nbytes,
        "warmup": args.warmup,
        "iters": args.iters,
        "methods": {},
    }
    why_not = None
    try:
        from ringserve.kv_transfer.nixl import available

        why_not = available()
    except Exception as e:  # report anything, then run the baselines
        why_not = f"{type(e).__name__}: {e}"
    results["nixl_missing"] = why_not
    if why_not is None:
        cache = make_cache(pool_blocks, args.block_size, device)
        if rank == 0:
            cache.k.normal_()
            cache.v.normal_()
        for layout in args.layouts.split(","):
            tables = [block_table(pool_blocks, request_blocks, layout, seed=r + 1) for r in range(2)]
            attempt(results, f"nixl-{layout}", args, cache, tables, args.tokens, (None, None), ctrl, rank)
        del cache
        for name, src_h, dst_h, *heads in HEAD_CASES if args.head_tokens else []:
            tokens = args.head_tokens
            cache = make_cache(tokens // args.block_size, args.block_size, device, src_h if rank == 0 else dst_h)
            if rank == 0:
                cache.k.normal_()
                cache.v.normal_()
            tables = [list(range(tokens // args.block_size))] * 2
            attempt(results, f"heads-{name}", args, cache, tables, tokens, tuple(heads), ctrl, rank)
            del cache
        if torch.cuda.is_available():  # give the pools back: the copy below puts 16 GiB on cuda:1
            torch.cuda.empty_cache()
    else:
        log(f"NIXL is missing: {why_not}; running the NCCL and copy baselines only")
    sizes = {nbytes} | {r["bytes"] for r in results["methods"].values() if r.get("bytes")}
    for size in sorted(sizes):  # the baselines, for every size NIXL moved
        if two_gpus or args.smoke:
            results["methods"][f"nccl-{size}"] = bench_nccl(args, size, device, ctrl, rank)
        results["methods"][f"copy-{size}"] = bench_copy(args, size, device, other, ctrl, rank)
    if rank == 0:
        report(results, args.out or (os.environ.get("OUT") and os.path.join(os.environ["OUT"], "kv_transfer_gpu.json")))
    dist.destroy_process_group()


def report(results: dict, out: str | None) -> None:
    methods = results["methods"]
    # The baseline of each size: NCCL between the two GPUs, or on one GPU a device copy.
    kind = "nccl" if any(name.startswith("nccl-") for name in methods) else "copy"
    base_s = {r["bytes"]: statistics.median(r["times"]) for name, r in methods.items() if name.startswith(kind)}
    print(
        f"\n{results['device']}, 8B-shaped bf16 KV, block {results['block_size']}, request of {results['tokens']} "
        f"tokens ({results['bytes'] / 2**30:.2f} GiB) in pools of {results['pool_blocks']} blocks, "
        f"{results['iters']} timed iterations (median)"
    )
    if results["nixl_missing"]:
        print(f"NIXL missing: {results['nixl_missing']}")
    contiguous = methods.get("nixl-contiguous", {}).get("times")
    print(f"| method | GiB | seconds | GB/s | {kind} GB/s | vs {kind} | vs contiguous | descs | runs src/dst | exact |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name, r in methods.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} | | | | | | | | |")
            continue
        s, base = statistics.median(r["times"]), base_s[r["bytes"]]
        r["seconds"], r["gb_per_s"], r["vs_baseline"] = s, r["bytes"] / s / 1e9, base / s
        vs = f"{statistics.median(contiguous) / s:.2f}" if contiguous and name.startswith("nixl-") else "-"
        runs = "/".join(map(str, r["runs"])) if "runs" in r else "-"
        descriptors = f"{r['descriptors']:.0f}" if "descriptors" in r else "-"
        print(
            f"| {name} | {r['bytes'] / 2**30:.2f} | {s:.4f} | {r['gb_per_s']:.1f} | {r['bytes'] / base / 1e9:.1f} | "
            f"{r['vs_baseline']:.2f} | {vs} | {descriptors} | {runs} | {r.get('bit_identical', '-')} |"
        )
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
    ap.add_argument("--pool-factor", type=int, default=4, help="pool blocks per request block")
    ap.add_argument("--layouts", default="contiguous,shuffled,mixed", help="NIXL block tables to measure")
    ap.add_argument("--head-tokens", type=int, default=16384, help="tokens of the head sub-range cases (0: none)")
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
