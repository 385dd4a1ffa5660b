"""TTFT and time per output token through the services vs the single-process engine (CPU).

Same default model, same prompts, greedy, in one run: first the in-process ``Engine``, then a
local cluster (``launch.start_cluster``: router + prefill group + decode worker as separate
processes talking gRPC, KV over TCP). The KV transfer of each prompt is also timed on its own
(``send_kv`` to a ``KVReceiver`` over loopback) so the table can show what the services add
beyond moving the KV: overhead = services TTFT - engine TTFT - transfer.

    python bench/services_cpu.py [--cp 1] [--repeats 5] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ringserve.client import Client
from ringserve.engine.engine import Engine
from ringserve.engine.sampling import SamplingParams
from ringserve.kv_transfer.tcp import KVReceiver, send_kv
from ringserve.launch import start_cluster


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed_stream(events, tokens: int) -> tuple[float, float]:
    """(TTFT s, mean time per output token after the first s) of an iterator of events or chunks
    that yields ``tokens`` tokens in all (a chunk may carry several: those queued together)."""
    t0 = time.perf_counter()
    first = last = None
    for _ in events:
        last = time.perf_counter()
        first = first or last
    return first - t0, (last - first) / max(1, tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cp", type=int, default=1, help="CP ranks of the prefill group")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--prompt-lengths", default="128,1024")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    prompts = {n: [100 + (i * 7) % 5000 for i in range(n)] for n in lengths}
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)

    log("loading the engine (in process)")
    engine = Engine.load(None)
    results = {}
    for n, ids in prompts.items():
        list(engine.generate(ids, params))  # warm-up
        runs = [timed_stream(engine.generate(ids, params), args.tokens) for _ in range(args.repeats)]
        results[("engine", n)] = runs
        log(f"engine {n} tokens: TTFT {statistics.median(r[0] for r in runs) * 1e3:.1f} ms")

    # The KV bytes of each prompt, moved alone: what the disaggregated path must pay anyway.
    c = engine.config
    receiver = KVReceiver(lambda frame: None, lambda frame, kv: None)
    for n in lengths:
        kv = torch.randn(c.num_hidden_layers, 2, n, c.num_key_value_heads, c.head_dim)
        send_kv(receiver.address, "warm", 1, "t", [(0, kv)])
        t = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            send_kv(receiver.address, "bench", 1, "t", [(0, kv)])
            t.append(time.perf_counter() - t0)
        results[("transfer", n)] = statistics.median(t)
    receiver.close()
    del engine

    log(f"starting a local cluster (cp={args.cp})")
    cluster = start_cluster(cp=args.cp)
    try:
        with Client(cluster.router, timeout=600) as client:
            for n, ids in prompts.items():
                list(client.generate(token_ids=ids, max_tokens=args.tokens, ignore_eos=True))  # warm-up
                runs = [
                    timed_stream(client.generate(token_ids=ids, max_tokens=args.tokens, ignore_eos=True), args.tokens)
                    for _ in range(args.repeats)
                ]
                results[("services", n)] = runs
                log(f"services {n} tokens: TTFT {statistics.median(r[0] for r in runs) * 1e3:.1f} ms")
    finally:
        cluster.stop()

    print(
        f"\nTTFT and TPOT, median of {args.repeats}, {args.tokens} tokens greedy, default model fp32, "
        f"services with CP={args.cp}"
    )
    head = [
        "prompt",
        "engine TTFT ms",
        "services TTFT ms",
        "KV transfer ms",
        "TTFT overhead ms",
        "engine TPOT ms",
        "services TPOT ms",
        "TPOT overhead ms",
    ]
    print("  ".join(f"{h:>16}" for h in head))
    for n in lengths:
        e, s = results[("engine", n)], results[("services", n)]
        e_ttft, s_ttft = statistics.median(r[0] for r in e), statistics.median(r[0] for r in s)
        e_tpot, s_tpot = statistics.median(r[1] for r in e), statistics.median(r[1] for r in s)
        xfer = results[("transfer", n)]
        row = [
            n,
            e_ttft * 1e3,
            s_ttft * 1e3,
            xfer * 1e3,
            (s_ttft - e_ttft - xfer) * 1e3,
            e_tpot * 1e3,
            s_tpot * 1e3,
            (s_tpot - e_tpot) * 1e3,
        ]
        print("  ".join(f"{x:>16.1f}" if isinstance(x, float) else f"{x:>16}" for x in row))


if __name__ == "__main__":
    main()
