"""What TLS and authentication cost on the request path (CPU): TTFT and TPOT through a plaintext
cluster and through a secure one, side by side in one run.

The secure cluster runs every gRPC hop over TLS (mutual between router and groups, certificates of
a CA made here with ``tests/certs.py``), API keys on the router, and a deployment secret (HMAC'd
NIXL landings and TCP KV frames). Both clusters run at once and the requests alternate between
them, so the machine's noise falls on both alike. Channels are made once: handshakes are not on
the request path (one per connection), only record encryption, the role and key checks and the MACs.

    PYTHONPATH=. python bench/tls_cpu.py [--repeats 7] [--tokens 16] [--prompt-lengths 128,2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ringserve.client import Client
from ringserve.launch import start_cluster
from ringserve.tls import ChannelTls
from tests.certs import CA

API_KEY = "bench-key-7d1e0c3b9a5f4862"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed_stream(chunks) -> tuple[float, float]:
    """(TTFT s, mean time per output token after the first s) of a stream of one-token chunks."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for _ in chunks:
        last = time.perf_counter()
        first = first or last
        n += 1
    return first - t0, (last - first) / max(1, n - 1)


def secure_cluster(directory: Path, transport: str):
    """A cluster with TLS on every interface, API keys and a deployment secret; and its client's TLS."""
    name = "bench-secure"
    ca = CA(directory)
    extra = {"decode": ["--kv-transfer", transport], "prefill": ["--kv-transfer", transport], "router": []}
    for role in extra:
        extra[role] += ca.issue(role, role=role, cluster=name).flags()
    (directory / "keys").write_text(f"bench {API_KEY}\n")
    (directory / "secret").write_text("bench-deployment-secret-0123456789\n")
    extra["router"] += ["--api-keys-file", str(directory / "keys")]
    for role in ("decode", "prefill"):
        extra[role] += ["--deployment-secret-file", str(directory / "secret")]
    probe = ca.issue("probe", role="router", cluster=name)
    tls = ChannelTls(ca.path, probe.cert, probe.key)
    return start_cluster(cp=1, extra=extra, name=name, tls=tls), ChannelTls(ca.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=16, help="generated tokens per request (ignore_eos)")
    ap.add_argument("--prompt-lengths", default="128,2048")
    ap.add_argument("--kv-transfer", default="tcp", help="tcp or nixl (both clusters)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    with tempfile.TemporaryDirectory() as d:
        log("starting a plaintext and a secure cluster (cp=1)")
        flags = ["--kv-transfer", args.kv_transfer]
        plain = start_cluster(cp=1, extra={"decode": flags, "prefill": flags})
        secure, client_tls = secure_cluster(Path(d), args.kv_transfer)
        runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
        try:
            clients = {
                "plaintext": Client(plain.router, timeout=600),
                "TLS + auth": Client(secure.router, timeout=600, api_key=API_KEY, tls=client_tls),
            }
            for n in lengths:
                ids = [100 + (i * 7) % 5000 for i in range(n)]
                for i in range(args.repeats + 1):  # the first round warms up
                    for kind, client in clients.items():
                        stream = client.generate(token_ids=[i, *ids[1:]], max_tokens=args.tokens, ignore_eos=True)
                        if i:
                            runs.setdefault((kind, n), []).append(timed_stream(stream))
                        else:
                            list(stream)
                log(f"{n} tokens done")
        finally:
            plain.stop()
            secure.stop()
    print(f"\nmedian of {args.repeats}, {args.tokens} tokens out, KV over {args.kv_transfer}, default model fp32")
    print("| prompt | plaintext TTFT ms | TLS + auth TTFT ms | plaintext TPOT ms | TLS + auth TPOT ms |")
    print("|---:|---:|---:|---:|---:|")
    for n in lengths:
        p, s = runs[("plaintext", n)], runs[("TLS + auth", n)]
        cells = [
            statistics.median(x[0] for x in p) * 1e3,
            statistics.median(x[0] for x in s) * 1e3,
            statistics.median(x[1] for x in p) * 1e3,
            statistics.median(x[1] for x in s) * 1e3,
        ]
        print(f"| {n} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
