"""Moving one request's KV between paged caches on CPU: NIXL vs the TCP path vs an in-process copy.

Two real processes: this one plays a prefill rank (source cache), a spawned one a decode worker
(destination cache, a NixlEndpoint, and the TCP ``KVReceiver`` whose sink
writes into the cache as the decode worker's does). Per KV shape, request length and block size:

- ``nixl``: ``NixlEndpoint.push`` of all rows (block runs -> descriptors, one WRITE with a
  notification), timed until it returns, i.e. until NIXL reports the WRITE complete;
- ``tcp``: what the services do today: gather the rows from the paged cache (as
  ``prefill_service.group.run_job``), ``send_kv`` (checksummed, acknowledged) to the receiver,
  whose sink scatters them into the destination blocks;
- ``copy``: the same gather/scatter between two caches inside this process (no transport).

With ``--heads N`` only the first N KV heads of each row move (a TP rank's piece of a decode
rank's rows). ``--strided`` says where that is a sub-range of the pool's heads: ``both`` (every
pool holds all heads: NIXL takes one descriptor per row, layer and K/V), ``src`` (the decode
pool holds just those N heads, as a decode rank of higher TP: NIXL gathers them into its staging
buffer and moves whole rows) or ``dst`` (the prefill pool holds just N heads, as a prefill rank
of higher TP: one descriptor per row again). TCP frames carry the destination's heads.

The request's block tables (``--layout``): ``shuffled`` (blocks drawn at random from the pool:
few coalesce), ``contiguous`` (fresh pools), or ``mixed`` (what the allocator hands the request
after a seeded mixed load on each pool, bench/fragment.py); pools hold ``--pool-factor`` times
the request's blocks. A KV too large for this machine's RAM is
moved in layer slices through one reused pair of caches (``--max-slice-gib`` per side): every
byte of every layer is moved, slice by slice, and the times add up. Each process uses one torch
thread. Every method's result is checked bit for bit (xxh3 of the rows on both sides).

    python bench/kv_transfer_cpu.py [--tokens 32768,131072] [--shapes smollm2,llama8b]
        [--block-sizes 16,64,256] [--methods nixl,tcp,copy] [--layout shuffled|contiguous|mixed]
        [--pool-factor 4] [--heads N --strided both|src|dst] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fragment import mixed_load_table  # noqa: E402

from ringserve.engine.config import ModelConfig  # noqa: E402
from ringserve.engine.kv_cache import KVCache  # noqa: E402

# (layers, kv heads, head dim, dtype): the default model as ringserve serves it (float32), and
# a Llama-3-8B-shaped cache in bf16.
SHAPES = {
    "smollm2": (30, 3, 64, torch.float32),
    "llama8b": (32, 8, 128, torch.bfloat16),
}
GIB = 1 << 30


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_cache(shape: str, layers: int, num_blocks: int, block_size: int, heads: int) -> KVCache:
    _, _, dim, dtype = SHAPES[shape]
    config = ModelConfig(
        vocab_size=1,
        hidden_size=heads * dim,
        intermediate_size=1,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=dim,
    )
    return KVCache(config, num_blocks, block_size, dtype=dtype)


def block_table(pool_blocks: int, request_blocks: int, layout: str, seed: int) -> list[int]:
    """The request's blocks in a pool of ``pool_blocks``, as ``layout`` says."""
    if layout == "contiguous":
        return list(range(request_blocks))
    if layout == "shuffled":
        return torch.randperm(pool_blocks, generator=torch.Generator().manual_seed(seed))[:request_blocks].tolist()
    return mixed_load_table(pool_blocks, request_blocks, seed)


def gather(cache: KVCache, table: list[int], n: int) -> torch.Tensor:
    """Rows [layers, 2, n, H, D] of a sequence, as the prefill group reads its shard to send it."""
    return torch.stack([torch.stack(cache.read(layer, table, n)) for layer in range(cache.k.shape[0])])


def digest(t: torch.Tensor) -> str:
    return xxhash.xxh3_64_hexdigest(t.contiguous().view(torch.uint8).numpy())


def decode_main(conn) -> None:
    """The decode side: answers commands on ``conn`` until told to stop."""
    from ringserve.kv_transfer.nixl import NixlEndpoint
    from ringserve.kv_transfer.tcp import KVReceiver, store_rows

    torch.set_num_threads(1)
    state: dict = {}

    def sink(frame, kv: torch.Tensor) -> None:
        cache, table = state["cache"], state["table"]
        store_rows(cache, cache.slots(table, frame.first_position, frame.first_position + kv.shape[2]), kv, frame.heads)

    receiver = KVReceiver(lambda frame: None, sink)
    while (msg := conn.recv()) is not None:
        cmd, args = msg
        if cmd == "setup":  # a fresh cache and endpoint per configuration
            if "endpoint" in state:
                state["endpoint"].close()
            state.clear()
            shape, layers, tokens, block_size, layout, pool_blocks, heads = args
            state["cache"] = make_cache(shape, layers, pool_blocks, block_size, heads)
            state["table"] = block_table(pool_blocks, tokens // block_size, layout, seed=2)
            state["endpoint"] = NixlEndpoint(state["cache"])
            conn.send((state["endpoint"].landing("bench", 1, state["table"], tokens), receiver.address))
        elif cmd == "zero":
            state["cache"].k.zero_()
            state["cache"].v.zero_()
            conn.send(None)
        elif cmd == "digest":
            tokens, n_heads = args
            conn.send(digest(gather(state["cache"], state["table"], tokens)[..., :n_heads, :]))
    receiver.close()


def run_config(conn, args, shape: str, tokens: int, block_size: int) -> list[dict]:
    layers, heads, dim, dtype = SHAPES[shape]
    n_heads = min(args.heads or heads, heads)
    # Each side's pool holds every head where the move is strided, else just the heads that move.
    src_h, dst_h = (heads if args.strided in (side, "both") else n_heads for side in ("src", "dst"))
    src_part, dst_part = (None if h == n_heads else range(n_heads) for h in (src_h, dst_h))
    pool_blocks = args.pool_factor * (tokens // block_size)
    row_bytes = 2 * heads * dim * dtype.itemsize  # K and V of one token in one layer
    # The largest slice of whole layers whose pool fits --max-slice-gib per side.
    pool_bytes = pool_blocks * block_size * row_bytes
    slice_layers = max(d for d in range(1, layers + 1) if layers % d == 0 and d * pool_bytes <= args.max_slice)
    slices = layers // slice_layers
    total = layers * tokens * row_bytes * n_heads // heads
    conn.send(("setup", (shape, slice_layers, tokens, block_size, args.layout, pool_blocks, dst_h)))
    src = make_cache(shape, slice_layers, pool_blocks, block_size, src_h)
    src.k.normal_()
    src.v.normal_()
    table = block_table(pool_blocks, tokens // block_size, args.layout, seed=1)
    landing, address = conn.recv()
    from ringserve.kv_transfer.landing import Landing
    from ringserve.kv_transfer.nixl import NixlEndpoint
    from ringserve.kv_transfer.tcp import send_kv

    endpoint = NixlEndpoint(src) if "nixl" in args.methods else None
    parsed = Landing.from_bytes(landing)
    want = digest(gather(src, table, tokens)[..., :n_heads, :])
    copy_dst = make_cache(shape, slice_layers, pool_blocks, block_size, dst_h) if "copy" in args.methods else None
    copy_table = block_table(pool_blocks, tokens // block_size, args.layout, seed=2)

    def one_slice(method: str) -> None:
        if method == "nixl":
            endpoint.push(table, 0, tokens, parsed, 0, uuid.uuid4().hex[:8], 600, src_part, dst_part)
        elif method == "tcp":
            rows = gather(src, table, tokens)[..., :n_heads, :]
            send_kv(address, "bench", 1, "t", [(0, rows)], timeout_s=600, heads=dst_part)
        else:  # copy: gather and scatter in this process
            s_slots = src.slots(table, 0, tokens)
            d_slots = copy_dst.slots(copy_table, 0, tokens)
            for layer in range(slice_layers):
                for a, b in ((src.k, copy_dst.k), (src.v, copy_dst.v)):
                    rows = a[layer].flatten(0, 1).index_select(0, s_slots)[:, :n_heads]
                    b[layer].flatten(0, 1)[d_slots, :n_heads] = rows

    rows = []
    descriptors: dict[str, float] = {}
    for method in args.methods:
        times = []
        posted = endpoint.descriptors_posted if endpoint is not None else 0
        for _ in range(args.repeats):
            if method == "copy":
                copy_dst.k.zero_()
                copy_dst.v.zero_()
            else:
                conn.send(("zero", None))
                conn.recv()
            t0 = time.perf_counter()
            for _ in range(slices):
                one_slice(method)
            times.append(time.perf_counter() - t0)
        if method == "nixl":  # per transfer (all its slices)
            descriptors[method] = (endpoint.descriptors_posted - posted) / args.repeats
        if method == "copy":
            got = digest(gather(copy_dst, copy_table, tokens)[..., :n_heads, :])
        else:
            conn.send(("digest", (tokens, n_heads)))
            got = conn.recv()
        seconds = statistics.median(times)
        row = {
            "shape": shape,
            "tokens": tokens,
            "block_size": block_size,
            "layout": args.layout,
            "pool_blocks": pool_blocks,
            "heads": n_heads,
            "strided": args.strided if n_heads < heads else None,
            "descriptors": descriptors.get(method),
            "gib": total / GIB,
            "slices": slices,
            "method": method,
            "seconds": seconds,
            "all_seconds": times,
            "gb_per_s": total / seconds / 1e9,
            "bit_identical": got == want,
        }
        rows.append(row)
        log(
            f"{shape} {tokens} tok bs={block_size} heads={n_heads} {method}: {seconds:.3f} s, "
            f"{row['gb_per_s']:.2f} GB/s, {slices} slice(s), bit-identical={row['bit_identical']}"
        )
    if endpoint is not None:
        endpoint.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="32768,131072")
    ap.add_argument("--shapes", default="smollm2,llama8b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--block-sizes", default="16,64,256")
    ap.add_argument("--methods", default="nixl,tcp,copy")
    ap.add_argument("--layout", choices=("shuffled", "contiguous", "mixed"), default="shuffled")
    ap.add_argument("--pool-factor", type=int, default=1, help="pool blocks per request block")
    ap.add_argument("--heads", type=int, default=0, help="move only this many KV heads of each row (0: all)")
    ap.add_argument("--strided", choices=("both", "src", "dst"), default="both", help="see above")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    ap.add_argument("--max-slice-gib", type=float, default=2.0, help="largest cache per side, in GiB")
    ap.add_argument("--out", help="also write every number as JSON here")
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    args.max_slice = int(args.max_slice_gib * GIB)
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    torch.set_num_threads(1)

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    decode = ctx.Process(target=decode_main, args=(there,), daemon=True)
    decode.start()
    rows = []
    try:
        for shape in args.shapes.split(","):
            for tokens in [int(t) for t in args.tokens.split(",")]:
                for block_size in [int(b) for b in args.block_sizes.split(",")]:
                    rows += run_config(here, args, shape, tokens, block_size)
    finally:
        here.send(None)
        decode.join(timeout=30)

    print("| KV shape | tokens | block | layout | heads | GiB | method | seconds | GB/s | x TCP | descs | bit-exact |")
    print("|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---|")
    tcp = {(r["shape"], r["tokens"], r["block_size"]): r["seconds"] for r in rows if r["method"] == "tcp"}
    for r in rows:
        tcp_s = tcp.get((r["shape"], r["tokens"], r["block_size"]))
        speedup = f"{tcp_s / r['seconds']:.1f}" if tcp_s else "-"
        heads = f"{r['heads']} ({r['strided']})" if r["strided"] else "all"
        print(
            f"| {r['shape']} | {r['tokens']} | {r['block_size']} | {r['layout']} | {heads} | {r['gib']:.2f} | "
            f"{r['method']} | {r['seconds']:.3f} | {r['gb_per_s']:.2f} | {speedup} | {r['descriptors'] or '-'} | "
            f"{r['bit_identical']} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
