"""Prefix-cache hit rate and TTFT of the router's policies on a shared-prefix workload (CPU).

For each policy (cache_aware, least_loaded, round_robin) a fresh local cluster: 4 prefill groups
(CP=1 each, default model, default prefix cache), 1 decode group, 1 router started with
``--policy``, one embedded Redis. Fresh clusters mean every policy starts with empty caches. The
router first gets one short random warm-up prompt per group (not measured; it shares nothing with
the workload).

The workload is seeded and the same for every policy, sent as ``token_ids`` prompts:

- documents: D random-token documents (``--doc-tokens`` long), each asked Q questions; a request
  is the document followed by a short random question;
- conversations: C multi-turn conversations; turn 1 is a random opening message, turn k's prompt
  is turn k-1's prompt, then its answer, then a new user message. The answer is a seeded
  stand-in of ``--max-tokens`` tokens rather than the generated one, so the prompts do not depend
  on the run; the prefill cache holds prompt KV only, so an answer's tokens are new to every prefill
  group either way.

All requests are shuffled together (a conversation's turns keep their order) and sent by
``--concurrency`` client threads, each taking the next request when its previous one finished (a
turn waits for the conversation's previous turn to finish).

Per request: TTFT = time from sending to the first streamed chunk; cached tokens = the final
chunk's ``usage.cached_prompt_tokens``. Hit rate = cached tokens / prompt tokens over all requests
(token-weighted). Oracle hit rate: just before sending each request, the bench asks the registry
in Redis which prefix of the prompt every prefill group holds (``Registry.probe``, the residency
the groups publish every heartbeat, evictions included) and takes the longest, capped as the
prefix cache caps it (at least one token is computed); an oracle that knows every cache would
send the request there. The groups' heartbeat is set to 0.2 s so the published residency lags
little; a request still in prefill elsewhere is not counted as held.

    python bench/routing_workload.py [--docs 6] [--questions 6] [--conversations 4] [--turns 5]
        [--concurrency 3] [--max-tokens 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

from ringserve.client import Client
from ringserve.config import WorkerArgs
from ringserve.engine.kv_cache import block_hashes
from ringserve.launch import start_cluster
from ringserve.registry import Registry, connect
from ringserve.router.policy import POLICIES

VOCAB = (100, 49000)  # random token ids drawn from here (the default model's vocabulary is 49152)
BLOCK = 64  # the prefill groups' default block size


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(*VOCAB) for _ in range(n)]


def workload(args) -> list[dict]:
    """The requests in sending order: {"id", "kind", "prompt", "after"} (after: a request id to wait for)."""
    rng = random.Random(args.seed)
    streams = []
    for d in range(args.docs):
        doc = tokens(rng, rng.randint(*args.doc_tokens))
        streams.append([{"id": f"doc{d}-q{q}", "kind": "document", "prompt": doc + tokens(rng, rng.randint(16, 48))}
                        for q in range(args.questions)])  # fmt: skip
    for c in range(args.conversations):
        prompt, turns = tokens(rng, rng.randint(*args.opening_tokens)), []
        for t in range(args.turns):
            if t:
                prompt = prompt + tokens(rng, args.max_tokens) + tokens(rng, rng.randint(*args.message_tokens))
            turns.append({"id": f"conv{c}-t{t}", "kind": "conversation", "prompt": prompt})
        streams.append(turns)
    # Interleave: a seeded shuffle of stream labels, then each stream's items in order.
    labels = [i for i, s in enumerate(streams) for _ in s]
    rng.shuffle(labels)
    order, next_of = [], [0] * len(streams)
    for i in labels:
        item = streams[i][next_of[i]]
        item["after"] = streams[i][next_of[i] - 1]["id"] if item["kind"] == "conversation" and next_of[i] else None
        next_of[i] += 1
        order.append(item)
    return order


def oracle_tokens(registry: Registry, prompt: list[int]) -> int:
    """The longest prefix of ``prompt`` that any prefill group holds (per the registry), as the
    prefix cache would reuse it."""
    groups = [g.id for g in registry.groups() if g.role == "prefill"]
    held = registry.probe([(g, 0) for g in groups], [block_hashes(prompt, BLOCK)])
    return min(max(held, default=0), (len(prompt) - 1) // BLOCK) * BLOCK


def send(client: Client, item: dict, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, last = None, None
    for chunk in client.generate(token_ids=item["prompt"], max_tokens=max_tokens, ignore_eos=True):
        ttft = ttft if ttft is not None else time.perf_counter() - t0
        last = chunk
    return {"ttft_s": ttft, "e2e_s": time.perf_counter() - t0, "cached": last.usage.cached_prompt_tokens}


def run_policy(policy: str, requests: list[dict], args) -> tuple[list[dict], float]:
    """Start a fresh cluster with the router on ``policy``, send the workload, return per-request records."""
    log(f"{policy}: starting the cluster")
    prefill_flags = ["--heartbeat-s", "0.2"]
    cluster = start_cluster(
        cp=1, name=f"routebench-{policy}", log_dir=args.log_dir,
        extra={"router": ["--policy", policy], "prefill": prefill_flags},
    )  # fmt: skip
    try:
        for i in range(1, args.groups):
            cluster.add(f"prefill{i}", ["prefill", "--cp", "1", "--dtype", "float32", *prefill_flags])
        registry = Registry(connect(WorkerArgs(redis_url=cluster.redis_url)), cluster.name)
        while sum(g.role == "prefill" for g in registry.groups()) < args.groups:
            time.sleep(0.2)
        time.sleep(1.5)  # the router re-reads the registry every 0.5 s
        with Client(cluster.router, timeout=600) as client:
            warm = random.Random(1)
            for _ in range(args.groups):  # idle groups take turns under every policy
                list(client.generate(token_ids=tokens(warm, 200), max_tokens=2, ignore_eos=True))
        time.sleep(0.5)
        log(f"{policy}: sending {len(requests)} requests, {args.concurrency} in flight")
        done = {r["id"]: threading.Event() for r in requests}
        records, lock, queue = [], threading.Lock(), list(requests)
        t_start = time.perf_counter()

        def client_thread() -> None:
            with Client(cluster.router, timeout=600) as client:
                while True:
                    with lock:
                        if not queue:
                            return
                        item = queue.pop(0)
                    if item["after"]:
                        done[item["after"]].wait()
                    oracle = oracle_tokens(registry, item["prompt"])
                    sent_at = time.perf_counter() - t_start
                    rec = send(client, item, args.max_tokens)
                    rec.update(id=item["id"], kind=item["kind"], prompt_tokens=len(item["prompt"]),
                               oracle=oracle, sent_at_s=sent_at)  # fmt: skip
                    with lock:
                        records.append(rec)
                    done[item["id"]].set()

        threads = [threading.Thread(target=client_thread) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        log(f"{policy}: done in {wall:.1f} s; {summary(records, wall)}")
        return records, wall
    finally:
        cluster.stop()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(records: list[dict], wall: float) -> dict:
    prompt = sum(r["prompt_tokens"] for r in records)
    ttft = [r["ttft_s"] for r in records]
    return {
        "requests": len(records),
        "prompt_tokens": prompt,
        "hit_rate": sum(r["cached"] for r in records) / prompt,
        "oracle_hit_rate": sum(r["oracle"] for r in records) / prompt,
        "ttft_p50_ms": percentile(ttft, 0.5) * 1e3,
        "ttft_p90_ms": percentile(ttft, 0.9) * 1e3,
        "ttft_mean_ms": sum(ttft) / len(ttft) * 1e3,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--groups", type=int, default=4, help="prefill groups (CP=1 each)")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--questions", type=int, default=6, help="requests per document")
    ap.add_argument("--doc-tokens", type=lambda s: tuple(map(int, s.split(","))), default=(800, 1500))
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--opening-tokens", type=lambda s: tuple(map(int, s.split(","))), default=(300, 600))
    ap.add_argument("--message-tokens", type=lambda s: tuple(map(int, s.split(","))), default=(40, 120))
    ap.add_argument("--max-tokens", type=int, default=4, help="generated tokens per request")
    ap.add_argument("--concurrency", type=int, default=3, help="requests in flight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-dir", default=None, help="the services' logs (default: discarded)")
    ap.add_argument("--out", default=None, help="write the summary and per-request records here (JSON)")
    args = ap.parse_args()
    # 4 prefill groups and a decode group share the machine's cores: one torch thread each.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    requests = workload(args)
    log(f"{len(requests)} requests, {sum(len(r['prompt']) for r in requests)} prompt tokens")
    results = {}
    for policy in args.policies.split(","):
        records, wall = run_policy(policy, requests, args)
        results[policy] = {"summary": summary(records, wall), "records": records}

    print(
        f"\n{len(requests)} requests ({args.docs} documents x {args.questions} questions, {args.conversations} "
        f"conversations x {args.turns} turns), {args.groups} prefill groups CP=1 + 1 decode group, "
        f"{args.concurrency} in flight, max_tokens {args.max_tokens}; load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    head = ["policy", "hit rate", "oracle hit", "TTFT p50 ms", "TTFT p90 ms", "TTFT mean ms", "wall s"]
    print("  ".join(f"{h:>13}" for h in head))
    for policy, res in results.items():
        s = res["summary"]
        row = [policy, s["hit_rate"], s["oracle_hit_rate"], s["ttft_p50_ms"], s["ttft_p90_ms"], s["ttft_mean_ms"],
               s["wall_s"]]  # fmt: skip
        print("  ".join(f"{x:>13.3f}" if isinstance(x, float) else f"{x:>13}" for x in row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
