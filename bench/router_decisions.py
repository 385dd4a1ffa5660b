"""Router decisions per second and decision latency, Redis round trip included.

A real Redis (embedded, or --redis-url) holds a registry of 64 prefill and 16 decode groups,
registered and heartbeating through ``heartbeat.Registration`` as the services do, and one million
resident blocks: each prefill group holds prefixes of several 128K-token documents (2048 blocks of
64 tokens each), so each document is partly cached on a few groups. A decision is
``Balancer.decide`` for a 128K-token prompt (a random prefix of a random document, then new
tokens), as ``Router.Generate`` runs it: the probe script (every prefill group's longest cached
prefix, every group's load) in one round trip, then scoring. Decisions run back to back in one
thread, then in several threads of the one process (as the router's gRPC threads run them);
decisions/s is their count over the wall time (prompts are made beforehand). The Redis column is
the server's own time per probe script (INFO commandstats).

Two residency shapes: ``documents`` (documents share nothing) and ``system prompt`` (every
document starts with the same 2048-token system prompt, so every group holds the prompt's first
block and the probe runs a full binary search in all 64 groups: the costly case).

Hashing the prompt's blocks (``block_hashes``, 2048 blake2b calls in Python) is per request but not
part of the decision; its time is printed on its own line.

    python bench/router_decisions.py [--decisions 3000] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
import uuid

import numpy as np

from ringserve.config import RouterConfig, WorkerArgs
from ringserve.engine.kv_cache import block_hashes
from ringserve.heartbeat import Registration
from ringserve.redis_server import EmbeddedRedis
from ringserve.registry_schema import Load
from ringserve.router.balancer import Balancer
from ringserve.router.policy import POLICIES


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def documents(seed: int, count: int, tokens: int, shared: int) -> list[list[int]]:
    """Random token ids; the first ``shared`` of every document are the same (a system prompt)."""
    ids = np.random.default_rng(seed).integers(0, 49152, size=(count, tokens))
    ids[:, :shared] = ids[0, :shared]
    return ids.tolist()


def residency(rng: random.Random, chains: list[list[bytes]], groups: int, total: int) -> list[list[bytes]]:
    """Per group, prefixes (at least half long) of random documents until the groups hold ``total``."""
    per_group = total // groups
    held = []
    for _ in range(groups):
        blocks: set[bytes] = set()
        while len(blocks) < per_group:
            chain = rng.choice(chains)
            for h in chain[: rng.randint(len(chain) // 2, len(chain))]:  # in chain order: prefix-closed
                blocks.add(h)
                if len(blocks) == per_group:
                    break
        held.append(sorted(blocks))
    return held


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(balancer: Balancer, prompts: list[list[bytes]], args, threads: int) -> tuple[float, list[float]]:
    """Decisions/s and per-decision latencies of ``args.decisions`` decisions made by ``threads`` threads."""
    latencies: list[float] = []

    def worker(first: int) -> None:
        for i in range(first, args.decisions, threads):
            t = time.perf_counter()
            decision = balancer.decide(args.prompt_tokens, 256, {args.block_size: prompts[i % len(prompts)]})
            latencies.append(time.perf_counter() - t)
            balancer.release(decision, "prefill")
            balancer.release(decision, "decode")

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return args.decisions / (time.perf_counter() - t0), latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", default=None, help="an existing Redis (default: start an embedded one)")
    ap.add_argument("--prefill-groups", type=int, default=64)
    ap.add_argument("--decode-groups", type=int, default=16)
    ap.add_argument("--resident-blocks", type=int, default=1_000_000, help="summed over the prefill groups")
    ap.add_argument("--prompt-tokens", type=int, default=131072)
    ap.add_argument("--block-size", type=int, default=64, help="the prefill groups' (PrefillConfig.block_size)")
    ap.add_argument("--documents", type=int, default=128)
    ap.add_argument("--decisions", type=int, default=3000, help="per row")
    ap.add_argument("--threads", default="1,4", help="decision threads in one process, one row each")
    args = ap.parse_args()
    rng = random.Random(0)
    server = None if args.redis_url else EmbeddedRedis().start()
    url = args.redis_url or server.url
    rows, memory = [], {}
    try:
        for shape, shared in (("documents", 0), ("system prompt", 2048)):
            cluster = f"bench-{uuid.uuid4().hex[:8]}"
            worker = WorkerArgs(redis_url=url, cluster=cluster, heartbeat_s=1.0, registry_ttl_s=30.0)
            log(f"{shape}: hashing {args.documents} documents of {args.prompt_tokens} tokens")
            docs = documents(shared, args.documents, args.prompt_tokens, shared)
            t0 = time.perf_counter()
            chains = [block_hashes(d, args.block_size) for d in docs]
            hash_ms = (time.perf_counter() - t0) / len(docs) * 1e3
            held = residency(rng, chains, args.prefill_groups, args.resident_blocks)
            log(
                f"{shape}: registering {args.prefill_groups} + {args.decode_groups} groups, "
                f"{sum(map(len, held))} blocks"
            )
            regs = []
            for i, blocks in enumerate(held):
                load = Load(queued_tokens=rng.randrange(0, 200_000), free_blocks=4096, total_blocks=4096,
                            tokens_per_s=rng.uniform(5_000, 20_000))  # fmt: skip
                batch = [(blocks, [])]
                regs.append(Registration(worker, "prefill", 8, args.block_size, lambda load=load: load,
                                         lambda batch=batch: batch.pop() if batch else ([], [])))  # fmt: skip
                regs[-1].start(f"10.0.{i // 256}.{i % 256}:50051")
            for i in range(args.decode_groups):
                load = Load(active_requests=rng.randrange(0, 32), free_blocks=rng.randrange(2048, 65536))
                regs.append(Registration(worker, "decode", 8, 64, lambda load=load: load).start(f"10.1.0.{i}:50061"))
            memory[shape] = regs[0].client.info("memory")["used_memory"] / 2**20
            prompts = []  # made beforehand, so the timed loop runs decisions only
            for _ in range(256):
                chain = rng.choice(chains)
                cut = rng.randint(0, len(chain))
                prompts.append(chain[:cut] + [os.urandom(16) for _ in range(len(chain) - cut)])
            for policy in POLICIES:
                balancer = Balancer(RouterConfig(redis_url=url, cluster=cluster, policy=policy)).start()
                for threads in (int(t) for t in args.threads.split(",")):
                    regs[0].client.config_resetstat()
                    rate, latencies = run(balancer, prompts, args, threads)
                    p50, p99 = percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3
                    stats = regs[0].client.info("commandstats").get("cmdstat_evalsha", {})
                    rows.append((shape, policy, threads, rate, p50, p99, float(stats.get("usec_per_call", 0.0))))
                    log(
                        f"{shape} {policy} {threads} threads: {rate:.0f} decisions/s, "
                        f"p50 {p50:.3f} ms, p99 {p99:.3f} ms"
                    )
                balancer.close()
            for reg in regs:
                reg.deregister()
    finally:
        if server is not None:
            server.stop()
    print(
        f"\n{args.prefill_groups} prefill + {args.decode_groups} decode groups, {args.resident_blocks} resident "
        f"blocks, {args.prompt_tokens}-token prompts ({args.prompt_tokens // args.block_size} blocks), "
        f"{args.decisions} decisions per row; load average at the end {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    head = ["residency", "policy", "threads", "decisions/s", "p50 ms", "p99 ms", "Redis us/probe"]
    print("  ".join(f"{h:>14}" for h in head))
    for row in rows:
        print("  ".join(f"{x:>14.3f}" if isinstance(x, float) else f"{x:>14}" for x in row))
    print(
        f"\nblock_hashes of one {args.prompt_tokens}-token prompt (per request, outside the decision): {hash_ms:.2f} ms"
    )
    for shape, mib in memory.items():
        print(f"Redis memory with the registry and residency ({shape}): {mib:.0f} MiB")


if __name__ == "__main__":
    main()
