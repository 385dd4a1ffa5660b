"""Serving benchmark: the real services (Redis, prefill group, decode group, router) driven through gRPC,
beside in-process baselines measured in the same run (in the spirit of `vllm bench serve`).

    # one H200, Llama-3-8B shape, random bf16 weights (both tiers on the GPU):
    python bench/serve_gpu.py --device cuda --out $OUT/serve.json
    # CPU, the embedded SmolLM2-135M, tiny sizes (a check that every phase runs):
    python bench/serve_gpu.py --device cpu --out /tmp/serve_cpu.json

Phases (``--phases``, in this order):

baseline  HBM bandwidth (a device-to-device copy, (read + write) / time, and a reduction, read / time;
          the higher is the floor's bandwidth, as in bench/kvp_gpu.py), then the in-process ``Engine``
          on the same weights: TTFT of one prompt in one pass (prefill + first sample) for every
          prompt length the other phases use. The engine is freed before the services start.
sweep     Closed loop: for each ``IN:OUT:C1,C2,..`` of ``--sweeps``, C streams kept in flight, each
          request IN random tokens in, exactly OUT out (ignore_eos); max(C, --min-requests) requests.
long      One prompt of each ``--long-lengths`` alone through the idle services (TTFT).
mixed     Medha's case: ``--mixed-short`` prompts one at a time on idle services, then one
          ``--mixed-long`` prompt with a short arriving every ``--mixed-every`` s while it prefills
          (shorts sent after the long's first token do not count as under load).
poisson   Open loop: Poisson arrivals at ``--rate``/s for ``--duration`` s; a prompt is long (uniform in
          ``--poisson-long``) with probability ``--long-share``, else short (uniform in
          ``--poisson-short``); outputs uniform in ``--poisson-out``. Seeded.

Metrics, per run: TTFT (send to first streamed token), TPOT (per request: (last - first) / (tokens - 1)),
ITL (every gap between streamed tokens), p50/p90/p99; requests/s and output tokens/s over the run's wall
time; "streams" is the mean number of requests between their first and last token (the decode batch the
service actually ran). Baselines beside them: the engine's one-pass TTFT for the same prompt length, and
the HBM floor of a decode step at C requests of the run's mean context ((weights + C x context x KV bytes
per token) / bandwidth), also at the measured streams. Clients run in ``--client-procs`` processes
(asyncio gRPC) so the client is not the bottleneck. Prompts are random token ids, distinct per request
(no prefix-cache hits).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import LLAMA3_8B  # noqa: E402

from ringserve.engine.kv_cache import blocks_needed  # noqa: E402
from ringserve.launch import start_cluster  # noqa: E402

BLOCK = 64
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --- the client side: runs in --client-procs processes --------------------------------------------


@dataclass
class Job:
    idx: int
    n_in: int
    n_out: int
    at_s: float | None = None  # open loop: send this many seconds after the run's start


@dataclass
class Record:
    idx: int
    n_in: int
    sent: float  # seconds after the run's start
    token_times: list[float]  # arrival of every streamed token
    error: str | None = None


def prompt_ids(job: Job, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + job.idx)
    return [rng.randrange(vocab) for _ in range(job.n_in)]


async def _one(client, job: Job, seed: int, vocab: int, start: float) -> Record:
    ids = prompt_ids(job, seed, vocab)
    if job.at_s is not None:
        await asyncio.sleep(max(0.0, start + job.at_s - time.monotonic()))
    sent = time.monotonic()
    times: list[float] = []
    try:
        async for chunk in client.generate(token_ids=ids, max_tokens=job.n_out, ignore_eos=True):
            now = time.monotonic() - start
            times.extend([now] * max(1, len(chunk.token_ids)))
        return Record(job.idx, job.n_in, sent - start, times)
    except Exception as e:  # a failed request is reported in the table, not fatal to the run
        return Record(job.idx, job.n_in, sent - start, times, f"{type(e).__name__}: {str(e)[:300]}")


async def _drive(address: str, jobs: list[Job], concurrency: int, seed: int, vocab: int, start: float):
    from ringserve.client import AsyncClient

    async with AsyncClient(address, timeout=3600) as client:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        if jobs and jobs[0].at_s is not None:  # open loop
            return await asyncio.gather(*(_one(client, j, seed, vocab, start) for j in jobs))
        queue = list(reversed(jobs))
        out: list[Record] = []

        async def worker():
            while queue:
                out.append(await _one(client, queue.pop(), seed, vocab, start))

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        return out


def client_proc(address: str, jobs: list[Job], concurrency: int, seed: int, vocab: int, start: float):
    """One client process's share of a run (picklable entry point)."""
    return [asdict(r) for r in asyncio.run(_drive(address, jobs, concurrency, seed, vocab, start))]


def run_jobs(pool, procs: int, address: str, jobs: list[Job], concurrency: int, seed: int, vocab: int):
    """Jobs spread round-robin over the client processes (closed loop: the concurrency too, and no
    process gets no stream: at concurrency 1 one process sends everything)."""
    closed = jobs[0].at_s is None
    procs = max(1, min(procs, len(jobs), concurrency if closed else len(jobs)))
    start = time.monotonic() + 0.5  # every process starts sending at the same instant
    shares = [jobs[p::procs] for p in range(procs)]
    conc = [concurrency // procs + (p < concurrency % procs) for p in range(procs)]
    futures = [pool.submit(client_proc, address, s, c, seed, vocab, start) for s, c in zip(shares, conc)]
    return [Record(**r) for f in futures for r in f.result()]


# --- metrics -------------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(records: list[Record]) -> dict:
    ok = [r for r in records if r.error is None and r.token_times]
    ttft = [r.token_times[0] - r.sent for r in ok]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in ok if len(r.token_times) > 1]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    t_begin = min((r.sent for r in records), default=0.0)
    t_end = max((r.token_times[-1] for r in ok), default=t_begin)
    wall = max(1e-9, t_end - t_begin)
    out_tokens = sum(len(r.token_times) for r in ok)
    s = {"requests": len(records), "ok": len(ok), "errors": [r.error for r in records if r.error][:5]}
    s["n_errors"] = len(records) - len(ok)
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 90, 99):
            s[f"{name}_p{q}_ms"] = None if not xs else pct(xs, q) * 1e3
    s["ttft_mean_ms"] = statistics.fmean(ttft) * 1e3 if ttft else None
    s.update(wall_s=wall, req_per_s=len(ok) / wall, out_tok_per_s=out_tokens / wall)
    s["in_tok_per_s"] = sum(r.n_in for r in ok) / wall
    s["streams"] = sum(r.token_times[-1] - r.token_times[0] for r in ok) / wall
    return s


# --- baselines -----------------------------------------------------------------------------------------


def timed(fn, iters: int, device) -> float:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def hbm_bandwidth(device) -> dict:
    import torch

    n = (4 << 30) if device.type == "cuda" else (256 << 20)
    x = torch.empty(n, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    copy_s = timed(lambda: y.copy_(x), 10, device)
    xs = x.view(torch.bfloat16)
    sum_s = timed(lambda: xs.sum(dtype=torch.float32), 10, device)
    return {"copy_gbps": 2 * n / copy_s / 1e9, "read_gbps": n / sum_s / 1e9}


def engine_baseline(args, lengths: list[int]) -> dict:
    """One-pass TTFT of the in-process Engine per prompt length, and the model's byte counts."""
    import torch

    from ringserve.engine.engine import Engine
    from ringserve.engine.model import Llama
    from ringserve.engine.sampling import SamplingParams
    from ringserve.engine.tokenizer import Tokenizer

    device = torch.device(args.device)
    model = Llama.load(args.model, getattr(torch, args.dtype), args.device, False, args.load_format)
    c, param = model.config, next(model.parameters())
    res = {
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "kv_bytes_per_token": c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * param.element_size(),
        "vocab": c.vocab_size,
        "ttft_s": {},
    }
    engine = Engine(model, Tokenizer.from_checkpoint(args.model), num_blocks=blocks_needed(max(lengths) + 8, BLOCK))
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    for n in sorted(lengths):
        ids = prompt_ids(Job(-1 - n, n, 1), args.seed, c.vocab_size)
        repeats = 1 if n >= 16384 else 3
        t = timed(lambda ids=ids, gen=engine.generate: list(gen(ids, params)), repeats, device)  # warm-up included
        res["ttft_s"][n] = t
        log(f"baseline: engine one-pass TTFT at {n} tokens: {t * 1e3:.1f} ms")
    del engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def floor_ms(base: dict, bw_gbps: float, batch: float, context: float) -> float:
    """HBM floor of one decode step: weights plus ``batch`` requests' KV of ``context`` tokens, read once."""
    return (base["weight_bytes"] + batch * context * base["kv_bytes_per_token"]) / (bw_gbps * 1e9) * 1e3


# --- the phases ----------------------------------------------------------------------------------------


def prom_counters(address: str | None, names: tuple[str, ...]) -> dict[str, float]:
    """Sums of the named Prometheus series at ``address`` (host:port of /metrics); {} if unreachable."""
    import urllib.request

    if not address:
        return {}
    try:
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


PASSES = ("ringserve_prefill_pass_seconds_count", "ringserve_prefill_pass_seconds_sum")


class Bench:
    """A running cluster, the client processes and the baselines: runs a list of jobs and annotates it."""

    def __init__(self, args, pool, cluster, base: dict):
        self.args, self.pool, self.cluster, self.base = args, pool, cluster, base
        self.bw = max(base.get("hbm", {}).values() or [0.0])
        self.next_idx = 0  # every prompt of the whole run is distinct: no prefix-cache hits

    def jobs(self, specs: list[tuple[int, int, float | None]]) -> list[Job]:
        out = [Job(self.next_idx + i, n_in, n_out, at) for i, (n_in, n_out, at) in enumerate(specs)]
        self.next_idx += len(specs)
        return out

    def run(self, label: str, jobs: list[Job], concurrency: int) -> tuple[dict, list[Record]]:
        log(f"{label}: {len(jobs)} requests, concurrency {concurrency if jobs[0].at_s is None else 'open loop'}")
        before = prom_counters(self.cluster.metrics.get("prefill"), PASSES)
        records = run_jobs(
            self.pool, self.args.client_procs, self.cluster.router, jobs, concurrency, self.args.seed, self.vocab
        )
        after = prom_counters(self.cluster.metrics.get("prefill"), PASSES)
        s = {"label": label, **summarize(records)}
        if before and after:
            s["prefill_passes"] = after[PASSES[0]] - before[PASSES[0]]
            s["prefill_pass_s"] = after[PASSES[1]] - before[PASSES[1]]
        log(f"{label}: ok {s['ok']}/{s['requests']}, TTFT p50 {fmt(s['ttft_p50_ms'])} ms, TPOT p50 "
            f"{fmt(s['tpot_p50_ms'])} ms, {s['out_tok_per_s']:.0f} out tok/s, {s['wall_s']:.1f} s"
            + (f"; errors: {s['errors'][:2]}" if s["n_errors"] else ""))  # fmt: skip
        return s, records

    @property
    def vocab(self) -> int:
        return self.base["vocab"]

    def annotate(self, s: dict, n_in: int, n_out: int, batch: int) -> dict:
        """The baselines beside a run of fixed lengths: engine TTFT and the decode step's HBM floor."""
        engine = self.base.get("ttft_s", {}).get(n_in)
        s["engine_ttft_ms"] = engine * 1e3 if engine else None
        if self.bw and "weight_bytes" in self.base and n_out > 1:
            ctx = n_in + n_out / 2
            s["floor_ms"] = floor_ms(self.base, self.bw, batch, ctx)
            s["floor_streams_ms"] = floor_ms(self.base, self.bw, max(1.0, s["streams"]), ctx)
            s["tpot_vs_floor"] = s["tpot_p50_ms"] / s["floor_ms"] if s["tpot_p50_ms"] else None
        return s


def parse_sweeps(text: str) -> list[tuple[int, int, list[int]]]:
    out = []
    for part in filter(None, text.split(";")):
        n_in, n_out, conc = part.split(":")
        out.append((int(n_in), int(n_out), [int(c) for c in conc.split(",")]))
    return out


def phase_sweep(b: Bench) -> list[dict]:
    sweeps = parse_sweeps(b.args.sweeps)
    top = max(c for _, _, cs in sweeps for c in cs)
    lo_in = min(n for n, _, _ in sweeps)
    for c in sorted({1, top}):  # warm-up: CUDA graphs of the decode batch sizes, cuDNN plans
        b.run(f"warm-up c={c}", b.jobs([(lo_in, 8, None)] * c), c)
    rows = []
    for n_in, n_out, concs in sweeps:
        for c in concs:
            jobs = b.jobs([(n_in, n_out, None)] * max(c, b.args.min_requests))
            s, _ = b.run(f"sweep {n_in}/{n_out} c={c}", jobs, c)
            rows.append(b.annotate({**s, "kind": "sweep", "n_in": n_in, "n_out": n_out, "concurrency": c}, n_in,
                                   n_out, c))  # fmt: skip
    return rows


def phase_long(b: Bench) -> list[dict]:
    rows = []
    for n in b.args.long_lengths:
        s, _ = b.run(f"long {n} alone", b.jobs([(n, b.args.long_out, None)]), 1)
        rows.append(b.annotate({**s, "kind": "long", "n_in": n, "n_out": b.args.long_out, "concurrency": 1}, n,
                               1, 1))  # fmt: skip
    return rows


def phase_mixed(b: Bench) -> dict:
    a = b.args
    idle, _ = b.run("mixed: shorts idle", b.jobs([(a.mixed_short, a.long_out, None)] * a.mixed_idle), 1)
    engine_long = b.base.get("ttft_s", {}).get(a.mixed_long)
    duration = a.mixed_duration or (2.5 * engine_long if engine_long else 30.0)
    shorts = [(a.mixed_short, a.long_out, a.mixed_every * (i + 1)) for i in range(int(duration / a.mixed_every))]
    jobs = b.jobs([(a.mixed_long, a.long_out, 0.0), *shorts])
    whole, records = b.run(f"mixed: {a.mixed_long} + shorts every {a.mixed_every} s", jobs, len(jobs))
    long_rec = next(r for r in records if r.idx == jobs[0].idx)
    long_first = long_rec.token_times[0] if long_rec.token_times else float("inf")
    under = summarize([r for r in records if r.idx != jobs[0].idx and r.sent < long_first])
    out = {
        "idle_short": b.annotate(idle, a.mixed_short, 1, 1),
        "short_under_load": under,
        "long_ttft_ms": (long_first - long_rec.sent) * 1e3 if long_rec.token_times else None,
        "long_error": long_rec.error,
        "engine_long_ttft_ms": engine_long * 1e3 if engine_long else None,
        "all": whole,
    }
    if under["ttft_p50_ms"] and idle["ttft_p50_ms"]:
        out["short_p50_vs_idle"] = under["ttft_p50_ms"] / idle["ttft_p50_ms"]
    if out["long_ttft_ms"] and engine_long:
        out["long_vs_one_pass"] = out["long_ttft_ms"] / out["engine_long_ttft_ms"]
    log(f"mixed: short p50 {fmt(under['ttft_p50_ms'])} ms under load vs {fmt(idle['ttft_p50_ms'])} idle; long "
        f"{fmt(out['long_ttft_ms'])} ms vs one pass {fmt(out['engine_long_ttft_ms'])}")  # fmt: skip
    return out


def poisson_specs(a) -> list[tuple[int, int, float]]:
    rng = random.Random(a.seed)
    specs, t = [], rng.expovariate(a.rate)
    while t < a.duration:
        lo, hi = a.poisson_long if rng.random() < a.long_share else a.poisson_short
        specs.append((rng.randint(lo, hi), rng.randint(*a.poisson_out), t))
        t += rng.expovariate(a.rate)
    return specs


def phase_poisson(b: Bench) -> dict:
    a = b.args
    specs = poisson_specs(a)
    jobs = b.jobs(specs)
    whole, records = b.run(f"poisson {a.rate}/s for {a.duration} s", jobs, len(jobs))
    long_lo = a.poisson_long[0]
    out = {"all": whole, "arrivals": [(n_in, n_out, round(t, 3)) for n_in, n_out, t in specs]}
    out["short"] = summarize([r for r in records if r.n_in < long_lo])
    out["long"] = summarize([r for r in records if r.n_in >= long_lo])
    return out


def fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


# --- report --------------------------------------------------------------------------------------------


COLUMNS = [
    ("run", lambda s: s["label"]),
    ("ok", lambda s: f"{s['ok']}/{s['requests']}"),
    ("TTFT p50/p90/p99 ms", lambda s: "/".join(fmt(s[f"ttft_p{q}_ms"], 0) for q in (50, 90, 99))),
    ("engine TTFT ms", lambda s: fmt(s.get("engine_ttft_ms"), 0)),
    ("TPOT p50/p90/p99 ms", lambda s: "/".join(fmt(s[f"tpot_p{q}_ms"]) for q in (50, 90, 99))),
    ("HBM floor ms (C / streams)", lambda s: f"{fmt(s.get('floor_ms'))} / {fmt(s.get('floor_streams_ms'))}"),
    ("TPOT / floor", lambda s: fmt(s.get("tpot_vs_floor"), 2)),
    ("ITL p50/p90/p99 ms", lambda s: "/".join(fmt(s[f"itl_p{q}_ms"]) for q in (50, 90, 99))),
    ("req/s", lambda s: fmt(s["req_per_s"], 2)),
    ("out tok/s", lambda s: fmt(s["out_tok_per_s"], 0)),
    ("streams", lambda s: fmt(s["streams"])),
    ("passes", lambda s: fmt(s.get("prefill_passes"), 0)),
]


def table(r: dict) -> str:
    rows = list(r.get("sweep", [])) + list(r.get("long", []))
    if "mixed" in r:
        m = r["mixed"]
        rows += [{**m["idle_short"], "label": "mixed: short, idle"}, {**m["short_under_load"], "label": "mixed: "
                 "short under the long"}, {**m["all"], "label": "mixed: everything"}]  # fmt: skip
    if "poisson" in r:
        p = r["poisson"]
        rows += [{**p[k], "label": f"poisson: {k}"} for k in ("all", "short", "long") if p[k]["requests"]]
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(get(s) for _, get in COLUMNS) + " |" for s in rows]
    if "mixed" in r:
        m = r["mixed"]
        lines.append(f"\nmixed: long TTFT {fmt(m['long_ttft_ms'], 0)} ms vs engine one pass "
                     f"{fmt(m['engine_long_ttft_ms'], 0)} ms ({fmt(m.get('long_vs_one_pass'), 2)}x); short TTFT p50 "
                     f"under it / idle = {fmt(m.get('short_p50_vs_idle'), 2)}x")  # fmt: skip
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------


PHASES = ("baseline", "sweep", "long", "mixed", "poisson")
GPU_DEFAULTS = dict(
    dtype="bfloat16", sweeps="64:256:1,16,64,128,256;1024:128:1,16,64,128,256;2048:1:64", long_lengths="32768,131072",
    mixed_short=2048, mixed_long=131072, mixed_idle=8, rate=2.0, duration=60.0, poisson_short="128-4096",
    poisson_long="32768-131072", poisson_out="32-256", prefill_kv_blocks=3072, decode_kv_blocks=6144, client_procs=4,
)  # fmt: skip
CPU_DEFAULTS = dict(
    dtype="float32", sweeps="16:8:1,4", long_lengths="512", mixed_short=32, mixed_long=1024, mixed_idle=3, rate=1.0,
    duration=6.0, poisson_short="16-64", poisson_long="256-512", poisson_out="4-8", prefill_kv_blocks=128,
    decode_kv_blocks=256, client_procs=1,
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (prefill rank r on cuda:r; decode on the next GPU if "
                   "there is one, else sharing cuda:0) or cpu")  # fmt: skip
    p.add_argument("--model", default=None, help="checkpoint directory; default: the Llama-3-8B shape with random "
                   "weights on GPU (--load-format dummy), the embedded SmolLM2-135M on CPU")  # fmt: skip
    p.add_argument("--load-format", default=None, help="auto or dummy (default: dummy for the built-in 8B shape)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer.json (+ tokenizer_config.json) for the 8B shape's "
                   "directory; default: the embedded model's converted tokenizer")  # fmt: skip
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--cp", type=int, default=1, help="CP ranks of the prefill group")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {','.join(PHASES)}")
    p.add_argument("--sweeps", default=None, help="IN:OUT:C1,C2,..[;IN:OUT:..] closed-loop concurrency sweeps")
    p.add_argument("--min-requests", type=int, default=4, help="requests per sweep level at least (else C)")
    p.add_argument("--long-lengths", default=None, help="comma-separated prompt lengths of the long phase")
    p.add_argument("--long-out", type=int, default=4, help="output tokens of long-phase and mixed-phase requests")
    p.add_argument("--mixed-short", type=int, default=None, help="short prompt length of the mixed phase")
    p.add_argument("--mixed-long", type=int, default=None, help="long prompt length of the mixed phase")
    p.add_argument("--mixed-every", type=float, default=0.5, help="seconds between shorts in the mixed phase")
    p.add_argument("--mixed-idle", type=int, default=None, help="shorts timed one at a time on idle services")
    p.add_argument("--mixed-duration", type=float, default=None, help="seconds shorts keep coming (default 2.5x the "
                   "engine's one-pass time of the long prompt, or 30)")  # fmt: skip
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    p.add_argument("--duration", type=float, default=None, help="seconds of Poisson arrivals")
    p.add_argument("--long-share", type=float, default=0.03, help="share of Poisson prompts that are long")
    p.add_argument("--poisson-short", default=None, help="LO-HI tokens of short Poisson prompts (uniform)")
    p.add_argument("--poisson-long", default=None, help="LO-HI tokens of long Poisson prompts (uniform)")
    p.add_argument("--poisson-out", default=None, help="LO-HI output tokens of Poisson requests (uniform)")
    p.add_argument("--prefill-kv-blocks", type=int, default=None, help="per prefill rank (at least the longest prompt)")
    p.add_argument("--decode-kv-blocks", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=256, help="the decode group's --max-batch")
    p.add_argument("--prefill-args", default="", help="more flags for `ringserve prefill`, e.g. '--target-pass-s 1'")
    p.add_argument("--decode-args", default="", help="more flags for `ringserve decode`")
    p.add_argument("--client-procs", type=int, default=None, help="client processes (default 4 on GPU, 1 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="the services' logs (default: beside --out, else a temp dir)")
    p.add_argument("--out", default=None, help="JSON file for every number")
    args = p.parse_args()
    for k, v in (GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.long_lengths = [int(x) for x in str(args.long_lengths).split(",") if x]
    for k in ("poisson_short", "poisson_long", "poisson_out"):
        setattr(args, k, tuple(int(x) for x in getattr(args, k).split("-")))
    args.phases = [x for x in args.phases.split(",") if x]
    if set(args.phases) - set(PHASES):
        p.error(f"unknown phases {sorted(set(args.phases) - set(PHASES))}; choose from {PHASES}")
    return args


def model_dir(args) -> None:
    """On GPU without --model: a directory with the 8B shape's config.json and a tokenizer (dummy weights)."""
    if args.model is not None or not args.device.startswith("cuda"):
        args.load_format = args.load_format or "auto"
        return
    tok = args.tokenizer_dir
    if tok is None:
        from ringserve.engine.tokenizer import Tokenizer
        from ringserve.engine.weights import default_model_path, gguf_cache_dir

        Tokenizer.from_checkpoint(None)  # converts the embedded model's tokenizer once
        tok = gguf_cache_dir(default_model_path())
    args.model = tempfile.mkdtemp(prefix="llama3-8b-shape-")
    Path(args.model, "config.json").write_text(json.dumps(LLAMA3_8B))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if Path(tok, name).is_file():
            shutil.copy(Path(tok, name), args.model)
    args.load_format = args.load_format or "dummy"


def lengths_used(args) -> list[int]:
    lengths = set(args.long_lengths)
    if "sweep" in args.phases:
        lengths |= {n for n, _, _ in parse_sweeps(args.sweeps)}
    if "mixed" in args.phases:
        lengths |= {args.mixed_short, args.mixed_long}
    return sorted(lengths)


def start_services(args):
    import torch

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    decode_device = f"cuda:{args.cp}" if gpus > args.cp else ("cuda:0" if gpus else args.device)
    where = f"prefill on cuda:0..{args.cp - 1}, decode on {decode_device}" if gpus > args.cp else (
        f"both tiers on {decode_device}" if gpus else "CPU")  # fmt: skip
    longest = max([*args.long_lengths, args.mixed_long, args.poisson_long[1]])
    prefill_blocks = max(args.prefill_kv_blocks, blocks_needed(longest, BLOCK) + 64)
    common = ["--load-format", args.load_format]
    extra = {
        "prefill": ["--device", args.device, *common, "--kv-blocks", str(prefill_blocks),
                    *shlex.split(args.prefill_args)],
        "decode": ["--device", decode_device, *common, "--kv-blocks", str(args.decode_kv_blocks), "--max-batch",
                   str(args.max_batch), *shlex.split(args.decode_args)],
    }  # fmt: skip
    log(f"starting the services ({where}; {gpus} GPU(s)): {extra}")
    cluster = start_cluster(cp=args.cp, kvp=1, model=args.model, dtype=args.dtype, extra=extra,
                            ready_timeout_s=900, log_dir=args.log_dir, metrics=True)  # fmt: skip
    return cluster, {"placement": where, "gpus": gpus, "prefill_kv_blocks": prefill_blocks, **decode_info(cluster)}


def decode_info(cluster) -> dict:
    import grpc

    from ringserve.v1 import decode_pb2, decode_pb2_grpc

    with grpc.insecure_channel(cluster.decode) as ch:
        info = decode_pb2_grpc.DecodeStub(ch).GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=30)
    return {"transport": info.transport, "decode_kv_blocks_free": info.kv_blocks_free}


def main() -> None:
    args = parse_args()
    model_dir(args)
    out = Path(args.out) if args.out else None
    args.log_dir = args.log_dir or str(out.parent / "logs" if out else tempfile.mkdtemp(prefix="serve-bench-logs-"))
    os.makedirs(args.log_dir, exist_ok=True)
    r: dict = {"config": {k: v for k, v in vars(args).items()}, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
               time.gmtime())}  # fmt: skip

    def save() -> None:
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(r, indent=1, default=str))

    log(f"device={args.device} model={args.model} load_format={args.load_format} dtype={args.dtype} "
        f"phases={args.phases} logs in {args.log_dir}")  # fmt: skip
    base: dict = {}
    if "baseline" in args.phases:
        import torch

        if args.device.startswith("cuda"):
            log(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
        base["hbm"] = hbm_bandwidth(torch.device(args.device))
        log(f"baseline: memory bandwidth {base['hbm']}")
        base.update(engine_baseline(args, lengths_used(args)))
        r["baseline"] = base
        save()
    pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    cluster, r["services"] = start_services(args)
    log(f"services up: {r['services']}")
    try:
        if "vocab" not in base:
            from ringserve.client import Client

            with Client(cluster.router, timeout=60) as c:
                base["vocab"] = c.model_info().model.vocab_size
        b = Bench(args, pool, cluster, base)
        for phase, fn in (("sweep", phase_sweep), ("long", phase_long), ("mixed", phase_mixed),
                          ("poisson", phase_poisson)):  # fmt: skip
            if phase in args.phases:
                r[phase] = fn(b)
                save()
    finally:
        log("stopping the services")
        cluster.stop()
        pool.shutdown(cancel_futures=True)
        save()
    print(table(r), flush=True)


if __name__ == "__main__":
    main()
