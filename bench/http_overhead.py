"""TTFT and time per output token through the OpenAI-compatible HTTP API vs gRPC, on one CPU cluster.

One local cluster (``launch.start_cluster``, CP=1, the default model, fp32) whose router serves both
doors. Each round sends the same streamed, greedy request through the `openai` client to
/v1/completions and through ``ringserve.client.Client`` to Generate, in alternating order so both
see the same machine noise. HTTP's overhead is the difference of the medians.

    python bench/http_overhead.py [--repeats 10] [--tokens 32] [--prompt-lengths 16,128,1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import openai

from ringserve.client import Client
from ringserve.launch import start_cluster
from ringserve.process_group import free_port


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed_stream(start, tokens: int) -> tuple[float, float]:
    """(TTFT s, mean time per output token after the first, s) of ``start()``, a call that returns an
    iterator of chunks yielding ``tokens`` tokens in all (a chunk may carry several: those queued
    together), timed from the call: the HTTP door answers it once the first token is there."""
    t0 = time.perf_counter()
    first = last = None
    for _ in start():
        last = time.perf_counter()
        first = first or last
    return first - t0, (last - first) / max(1, tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--prompt-lengths", default="16,128,1024")
    args = ap.parse_args()
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    http_port = free_port()
    log("starting a local cluster (cp=1) with the HTTP API")
    cluster = start_cluster(cp=1, extra={"router": ["--http-port", str(http_port)]})
    print(f"HTTP (openai client, SSE) vs gRPC, median of {args.repeats}, {args.tokens} tokens greedy, CP=1, fp32, CPU")
    head = ["prompt", "gRPC TTFT ms", "HTTP TTFT ms", "TTFT +ms", "gRPC TPOT ms", "HTTP TPOT ms", "TPOT +ms"]
    print("  ".join(f"{h:>13}" for h in head), flush=True)
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=600)
        with Client(cluster.router, timeout=600) as grpc_client:
            model = grpc_client.model_info().model.name
            for n in lengths:
                # A different prompt per request: no prefix-cache hits, every request prefills all of it.
                def prompt(i: int, n=n) -> list[int]:
                    return [100 + (i * 131 + j * 7) % 5000 for j in range(n)]

                def http(i: int) -> tuple[float, float]:
                    return timed_stream(
                        lambda: api.completions.create(
                            model=model, prompt=prompt(i), max_tokens=args.tokens, stream=True,
                            extra_body={"ignore_eos": True},
                        ),
                        args.tokens,
                    )  # fmt: skip

                def grpc(i: int) -> tuple[float, float]:
                    return timed_stream(
                        lambda: grpc_client.generate(token_ids=prompt(i), max_tokens=args.tokens, ignore_eos=True),
                        args.tokens,
                    )

                http(0), grpc(1)  # warm-up: connections, first passes
                runs: dict[str, list[tuple[float, float]]] = {"http": [], "grpc": []}
                for r in range(args.repeats):
                    pair = [("http", http), ("grpc", grpc)]
                    for door, run in pair if r % 2 == 0 else pair[::-1]:
                        runs[door].append(run(2 + 2 * r + (door == "grpc")))
                print_row(n, runs)
    finally:
        cluster.stop()


def print_row(n: int, runs: dict[str, list[tuple[float, float]]]) -> None:
    g, h = runs["grpc"], runs["http"]
    g_ttft, h_ttft = statistics.median(r[0] for r in g), statistics.median(r[0] for r in h)
    g_tpot, h_tpot = statistics.median(r[1] for r in g), statistics.median(r[1] for r in h)
    row = [g_ttft, h_ttft, h_ttft - g_ttft, g_tpot, h_tpot, h_tpot - g_tpot]
    print(f"{n:>13}  " + "  ".join(f"{x * 1e3:>13.1f}" for x in row), flush=True)


if __name__ == "__main__":
    main()
