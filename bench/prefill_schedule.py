"""Short-request TTFT next to long prompts: the prefill group's FCFS and LRS schedules side by side.

Each request goes to a ``PrefillGroup`` (CP ranks, the group's own scheduler) with no KV targets,
so what is timed is the prefill alone: TTFT = from ``submit`` to its future's result.

    # CPU: default model (SmolLM2-135M, float32), CP = 2, 256-token shorts, one 16K-token long
    # (on 2 cores a 16K prefill alone takes ~3 min, the run ~10; --long-tokens 8192: ~4 min in all)
    PYTHONPATH=$PWD python bench/prefill_schedule.py --out /tmp/prefill_schedule.json
    PYTHONPATH=$PWD python bench/prefill_schedule.py --long-tokens 8192 --short-ttft-s 20 --out /tmp/ps.json

    # GPU: Llama-3-8B-shaped random bf16 weights, CP = 2 on two GPUs, 1-4K shorts, one 512K long
    PYTHONPATH=$PWD python bench/prefill_schedule.py --device cuda --out $OUT/prefill_schedule.json

Sections (--sections), in order:

idle           Short prompts alone, one at a time: short TTFT p50/p99 of an idle group.
long_alone     One long prompt alone, chunked as the scheduler chooses (--target-pass-s): its TTFT
               and number of passes.
long_one_pass  (Runs last: the most memory.) The long prompt alone in one pass (max_pass_tokens >=
               the prompt): chunking overhead = long_alone / long_one_pass - 1. By default on GPU
               only (on CPU a 16K prefill alone takes minutes; ask with --sections).
mix            For each policy (--policies, default fcfs then lrs): an open-loop
               stream. Short prompts arrive as a Poisson process (seeded) at a rate that uses
               --short-load of the group's time (from the idle mean), for --mix-s seconds; --mix-longs
               long prompts arrive at --long-lead + k * --long-every seconds. A thread submits each
               request at its arrival time without waiting for results. Both policies get the very
               same arrival schedule. Reported: short TTFT p50/p99/max, the long's TTFT and its
               ratio to long_alone, deadlines met (the group's default TTFT deadlines:
               max(ttft_min_s, ttft_factor * predicted time alone), or --short-ttft-s for
               shorts), scheduler passes.

               LRS orders requests already past their deadline after all that can still meet
               theirs. A short whose deadline passes while it waits for one long chunk (CPU: a
               pass can take seconds, longer than the default 1 s) then waits for the whole long
               prompt; --short-ttft-s above one pass's time shows the schedule without that.

All phases run on one group (one process can lead only one group): before each phase the idle
group gets a fresh scheduler with that phase's policy and limits (fresh counters; the cost model,
calibrated at start, is shared and keeps learning). idle and long_alone use LRS (with one request
at a time the policy makes no difference). Every prompt's tokens are random (distinct) and the
prefix cache is off, so nothing is ever read from cache.

Output: one table on stdout, every number in --out (JSON), progress lines on stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast must stay off on these hosts
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes import LLAMA3_8B  # noqa: E402

from ringserve.config import PrefillConfig  # noqa: E402
from ringserve.prefill_service.group import Prefilled, PrefillGroup  # noqa: E402
from ringserve.prefill_service.prefix_cache import new_blocks_per_rank  # noqa: E402
from ringserve.prefill_service.protocol import Job  # noqa: E402
from ringserve.prefill_service.scheduler import Scheduler  # noqa: E402

SECTIONS = ("idle", "long_alone", "mix", "long_one_pass")  # the one big pass last: the most memory


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class DeadlineLog(logging.Handler):
    """Collects the group's own verdict per request ("request_id=... ttft_deadline=met|missed")."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.met: dict[str, bool] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("request_id=") and record.args:
            self.met[str(record.args[0])] = record.args[1] == "met"


DEADLINES = DeadlineLog()


@dataclass
class Outcome:
    """One request as the benchmark saw it."""

    request_id: str
    kind: str  # "short" or "long"
    tokens: int
    arrival_s: float  # submit time, from the phase's start
    ttft_s: float | None = None  # from submit to result; None: it failed
    passes: int = 0
    queued_s: float = 0.0
    deadline_met: bool | None = None
    error: str | None = None


@dataclass
class Arrival:
    at_s: float
    kind: str
    tokens: int


@dataclass
class Bench:
    """What every phase needs: the arguments, the token source, the numbers so far."""

    args: argparse.Namespace
    rng: random.Random
    vocab: int = 0
    seq: int = 0
    results: dict = field(default_factory=dict)

    def prompt(self, n: int) -> list[int]:
        """Random token ids: every prompt distinct, so no block of one is ever another's."""
        return [self.rng.randrange(1, self.vocab) for _ in range(n)]

    def request_id(self, kind: str) -> str:
        self.seq += 1
        return f"{kind}-{self.seq}"


def short_sizes(spec: str) -> tuple[int, int]:
    """"256" -> (256, 256); "1024-4096" -> (1024, 4096)."""
    lo, _, hi = spec.partition("-")
    return int(lo), int(hi or lo)


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of xs; None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def make_group(args: argparse.Namespace) -> PrefillGroup:
    """The one group of this run (a process can lead only one: its torch.distributed group
    outlives ``PrefillGroup.close``); phases swap its scheduler with ``use_schedule``."""
    cfg = PrefillConfig(
        cp=args.cp,
        kv_blocks=args.kv_blocks,
        block_size=args.block_size,
        device=args.device,
        dtype=args.dtype,
        model=args.model,
        load_format=args.load_format,
        prefix_cache=0.0,
        schedule="lrs",
        target_pass_s=args.target_pass_s,
        max_pass_tokens=args.max_pass_tokens,
        calibrate_tokens=args.calibrate_tokens,
        kv_transfer="tcp",
        group_timeout_s=args.group_timeout_s,
    )
    t0 = time.perf_counter()
    group = PrefillGroup(cfg)
    log(f"group ready in {time.perf_counter() - t0:.1f} s: {group.cost}")
    return group


def use_schedule(group: PrefillGroup, args: argparse.Namespace, policy: str, *, one_pass: bool = False) -> None:
    """Give the idle group a fresh scheduler (fresh counters, same cost model) with ``policy``;
    ``one_pass``: chunking off (the long prompt fits one pass and one pass's time limit)."""
    assert not group.scheduler.requests, "the scheduler is swapped only between phases, when idle"
    target, max_pass_tokens = args.target_pass_s, args.max_pass_tokens
    if one_pass:
        target, max_pass_tokens = 1e9, max(max_pass_tokens, args.long_tokens)
    cfg = dataclasses.replace(group.scheduler.cfg, policy=policy, target_pass_s=target, max_pass_tokens=max_pass_tokens)
    group.scheduler = Scheduler(cfg, group.cost)


def ttft_budget(args: argparse.Namespace, kind: str) -> float | None:
    """A short request's TTFT deadline (--short-ttft-s); None: the group's default."""
    return args.short_ttft_s if kind == "short" else None


def run_one(b: Bench, group: PrefillGroup, kind: str, tokens: int) -> Outcome:
    """Submit one request and wait for it."""
    out = Outcome(b.request_id(kind), kind, tokens, 0.0)
    ids = b.prompt(tokens)
    t0 = time.perf_counter()
    fut = group.submit(Job(out.request_id, ids, "auto", [], ttft_budget(b.args, kind)))
    finish(out, fut, t0)
    return out


def finish(out: Outcome, fut: Future, t0: float) -> None:
    """Wait for ``fut`` and fill ``out``: TTFT from ``t0`` (unless a done-callback already took
    it, when the future resolved), or the error."""
    try:
        res: Prefilled = fut.result()
    except Exception as e:  # a failed request is reported, not fatal
        out.error = f"{type(e).__name__}: {e}"
        return
    if out.ttft_s is None:
        out.ttft_s = time.perf_counter() - t0
    out.passes, out.queued_s = res.passes, res.queued_s
    out.deadline_met = DEADLINES.met.get(out.request_id)


def phase_idle(b: Bench, group: PrefillGroup) -> dict:
    lo, hi = short_sizes(b.args.short_tokens)
    run_one(b, group, "warmup", lo)  # not counted
    outs = []
    for i in range(b.args.idle_requests):
        outs.append(run_one(b, group, "short", b.rng.randint(lo, hi)))
        if (i + 1) % 10 == 0:
            log(f"idle: {i + 1}/{b.args.idle_requests}")
    ttfts = [o.ttft_s for o in outs if o.ttft_s is not None]
    return {
        "short_p50_s": pct(ttfts, 50),
        "short_p99_s": pct(ttfts, 99),
        "short_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "requests": [asdict(o) for o in outs],
    }


def phase_long(b: Bench, group: PrefillGroup) -> dict:
    passes0 = group.scheduler.passes
    o = run_one(b, group, "long", b.args.long_tokens)
    if o.error:
        log(f"long failed: {o.error}")
    return {"long_ttft_s": o.ttft_s, "long_passes": o.passes, "group_passes": group.scheduler.passes - passes0,
            "requests": [asdict(o)]}


def arrivals(b: Bench, service_s: float, long_s: float) -> tuple[list[Arrival], dict]:
    """The mix's arrival schedule (the same for every policy)."""
    a = b.args
    lo, hi = short_sizes(a.short_tokens)
    every = a.long_every if a.long_every is not None else 1.25 * long_s
    duration = a.mix_s if a.mix_s is not None else a.long_lead + a.mix_longs * every
    rate = a.short_load / service_s
    rng = random.Random(a.seed + 1)
    out = [Arrival(a.long_lead + k * every, "long", a.long_tokens) for k in range(a.mix_longs)]
    t = rng.expovariate(rate)
    while t < duration:
        out.append(Arrival(t, "short", rng.randint(lo, hi)))
        t += rng.expovariate(rate)
    out.sort(key=lambda x: x.at_s)
    info = {"short_rate_per_s": rate, "short_service_s": service_s, "duration_s": duration, "long_every_s": every,
            "shorts": sum(x.kind == "short" for x in out), "longs": a.mix_longs}
    return out, info


def phase_mix(b: Bench, group: PrefillGroup, schedule: list[Arrival], long_alone_s: float | None) -> dict:
    """Open loop: a thread submits at the arrival times; each result's time is taken when it resolves."""
    prompts = [b.prompt(x.tokens) for x in schedule]  # made before the clock starts
    outs = [Outcome(b.request_id(x.kind), x.kind, x.tokens, x.at_s) for x in schedule]
    futs: list[Future | None] = [None] * len(schedule)
    submitted = [0.0] * len(schedule)
    passes0, finished0, late0 = group.scheduler.passes, group.scheduler.finished, group.scheduler.late
    start = time.perf_counter()

    def done_at(i: int):
        def cb(_: Future) -> None:
            outs[i].ttft_s = time.perf_counter() - submitted[i]

        return cb

    def submitter() -> None:
        for i, x in enumerate(schedule):
            delay = start + x.at_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            submitted[i] = time.perf_counter()
            outs[i].arrival_s = submitted[i] - start
            try:
                job = Job(outs[i].request_id, prompts[i], "auto", [], ttft_budget(b.args, outs[i].kind))
                fut = group.submit(job)
            except Exception as e:  # refused at once: reported, the stream goes on
                outs[i].error = f"{type(e).__name__}: {e}"
                continue
            fut.add_done_callback(done_at(i))
            futs[i] = fut

    thread = threading.Thread(target=submitter, name="mix-submitter", daemon=True)
    thread.start()
    last_note = time.perf_counter()
    while thread.is_alive() or any(f is not None and not f.done() for f in futs):
        time.sleep(0.2)
        if time.perf_counter() - last_note > 10:
            last_note = time.perf_counter()
            n_done = sum(f is not None and f.done() for f in futs)
            elapsed = time.perf_counter() - start
            log(f"mix ({group.scheduler.cfg.policy}): {elapsed:.0f} s, {n_done}/{len(schedule)} done")
    thread.join()
    for i, f in enumerate(futs):
        if f is not None:
            finish(outs[i], f, submitted[i])
    shorts = [o for o in outs if o.kind == "short"]
    longs = [o for o in outs if o.kind == "long"]
    st = [o.ttft_s for o in shorts if o.ttft_s is not None and o.error is None]
    lt = [o.ttft_s for o in longs if o.ttft_s is not None and o.error is None]
    long_ttft = max(lt) if lt else None
    return {
        "policy": group.scheduler.cfg.policy,
        "wall_s": time.perf_counter() - start,
        "short_p50_s": pct(st, 50),
        "short_p99_s": pct(st, 99),
        "short_max_s": max(st) if st else None,
        "short_deadlines_met": sum(bool(o.deadline_met) for o in shorts),
        "shorts": len(shorts),
        "long_ttft_s": long_ttft,
        "long_vs_alone": long_ttft / long_alone_s if long_ttft and long_alone_s else None,
        "long_passes": max((o.passes for o in longs), default=0),
        "long_deadlines_met": sum(bool(o.deadline_met) for o in longs),
        "longs": len(longs),
        "errors": sum(o.error is not None for o in outs),
        "group_passes": group.scheduler.passes - passes0,
        "finished": group.scheduler.finished - finished0,
        "late": group.scheduler.late - late0,
        "requests": [asdict(o) for o in outs],
    }


def fmt(x: float | None, unit: str = "s") -> str:
    if x is None:
        return "-"
    if unit == "x":
        return f"{x:.2f}x"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def table(r: dict) -> str:
    head = ["phase", "policy", "shorts", "short p50 s", "short p99 s", "short max s", "long TTFT s", "long/alone",
            "long passes", "deadlines met", "group passes"]
    rows = []
    if "idle" in r:
        i = r["idle"]
        rows.append(["idle", "-", str(len(i["requests"])), fmt(i["short_p50_s"]), fmt(i["short_p99_s"]),
                     fmt(max((q["ttft_s"] or 0 for q in i["requests"]), default=None)), "-", "-", "-", "-", "-"])
    for name in ("long_alone", "long_one_pass"):
        if name in r:
            x = r[name]
            rows.append([name, "lrs" if name == "long_alone" else "one pass", "0", "-", "-", "-",
                         fmt(x["long_ttft_s"]), "-", str(x["long_passes"]), "-", str(x["group_passes"])])
    for m in r.get("mix", {}).values():
        met = f"{m['short_deadlines_met']}/{m['shorts']} + {m['long_deadlines_met']}/{m['longs']}"
        rows.append(["mix", m["policy"], str(m["shorts"]), fmt(m["short_p50_s"]), fmt(m["short_p99_s"]),
                     fmt(m["short_max_s"]), fmt(m["long_ttft_s"]), fmt(m["long_vs_alone"], "x"),
                     str(m["long_passes"]), met, str(m["group_passes"])])
    widths = [max(len(h), *(len(row[k]) for row in rows)) if rows else len(h) for k, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    summary = []
    if "idle" in r and r["idle"]["short_p50_s"]:
        for m in r.get("mix", {}).values():
            if m["short_p50_s"]:
                summary.append(f"{m['policy']}: short p50 under load / idle p50 = "
                               f"{m['short_p50_s'] / r['idle']['short_p50_s']:.2f}x")
    if r.get("chunking_overhead") is not None:
        summary.append(f"chunking overhead (long_alone / long_one_pass - 1) = {100 * r['chunking_overhead']:.1f}%")
    return "\n".join(lines + summary)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (rank r uses cuda:r)")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--model", default=None,
                   help="model directory; default: the embedded SmolLM2-135M on CPU, Llama-3-8B shape on GPU")
    p.add_argument("--load-format", default=None, help="auto or dummy; default: dummy with the Llama-3-8B shape")
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--short-tokens", default=None, help="N or LO-HI (uniform); default 256 on CPU, 1024-4096 on GPU")
    p.add_argument("--long-tokens", type=int, default=None, help="default 16384 on CPU, 524288 on GPU")
    p.add_argument("--idle-requests", type=int, default=None, help="shorts in the idle phase (default 20 CPU, 30 GPU)")
    p.add_argument("--short-load", type=float, default=0.1, help="share of the group's time the shorts use in mix")
    p.add_argument("--mix-longs", type=int, default=1, help="long prompts in each mix phase")
    p.add_argument("--long-lead", type=float, default=None,
                   help="seconds into mix the first long arrives (default: 4 short service times)")
    p.add_argument("--long-every", type=float, default=None, help="seconds between longs (default 1.25 x long alone)")
    p.add_argument("--mix-s", type=float, default=None,
                   help="seconds shorts keep arriving (default: until long-lead + mix-longs x long-every)")
    p.add_argument("--policies", default="fcfs,lrs")
    p.add_argument("--short-ttft-s", type=float, default=None,
                   help="TTFT deadline of each short request; default: the group's (max(1 s, 3 x predicted alone))")
    p.add_argument("--target-pass-s", type=float, default=0.25)
    p.add_argument("--max-pass-tokens", type=int, default=65536)
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="per rank; default: the mix's longs plus 16 of the largest shorts, plus 8")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--calibrate-tokens", type=int, default=2048)
    p.add_argument("--group-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sections", default=None,
                   help=f"comma-separated, of {','.join(SECTIONS)}; default: all on GPU, all but long_one_pass on CPU")
    p.add_argument("--out", default=None, help="JSON file for every number")
    args = p.parse_args()

    gpu = args.device.startswith("cuda")
    args.device = "cuda" if gpu else args.device
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.short_tokens = args.short_tokens or ("1024-4096" if gpu else "256")
    args.long_tokens = args.long_tokens or (524288 if gpu else 16384)
    args.idle_requests = args.idle_requests or (30 if gpu else 20)
    if gpu and args.model is None:
        tmp = tempfile.mkdtemp(prefix="llama3-8b-shape-")
        Path(tmp, "config.json").write_text(json.dumps(LLAMA3_8B))
        args.model, args.load_format = tmp, args.load_format or "dummy"
    args.load_format = args.load_format or "auto"
    _, short_hi = short_sizes(args.short_tokens)
    if args.kv_blocks is None:
        per_rank = max(new_blocks_per_rank(args.long_tokens, args.cp, args.block_size))
        short_rank = max(new_blocks_per_rank(short_hi, args.cp, args.block_size))
        args.kv_blocks = per_rank * args.mix_longs + 16 * short_rank + 8
    if args.sections is None:  # on CPU a 16K prefill takes minutes: the overhead check is the GPU's
        args.sections = ",".join(s for s in SECTIONS if gpu or s != "long_one_pass")
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    policies = [x for x in args.policies.split(",") if x]

    group_log = logging.getLogger("ringserve.prefill_service.group")
    group_log.setLevel(logging.INFO)
    group_log.addHandler(DEADLINES)
    group_log.propagate = False  # the per-request INFO lines would drown the progress lines

    b = Bench(args, random.Random(args.seed))
    r = b.results
    r["config"] = {k: v for k, v in vars(args).items()}
    t_start = time.perf_counter()

    def save() -> None:
        r["wall_s"] = time.perf_counter() - t_start
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(r, indent=1))

    log(f"device={args.device} dtype={args.dtype} cp={args.cp} model={args.model or 'default'} "
        f"shorts={args.short_tokens} long={args.long_tokens} kv_blocks={args.kv_blocks} sections={sections}")
    service_s = long_s = None
    group = make_group(args)
    b.vocab = group.model.config.vocab_size
    r["cost_model_start"] = repr(group.cost)
    try:
        if "idle" in sections:
            use_schedule(group, args, "lrs")
            log(f"idle: {args.idle_requests} shorts of {args.short_tokens} tokens, one at a time")
            r["idle"] = phase_idle(b, group)
            service_s = r["idle"]["short_mean_s"]
            log(f"idle: p50 {fmt(r['idle']['short_p50_s'])} s, p99 {fmt(r['idle']['short_p99_s'])} s")
            save()
        if "long_alone" in sections:
            use_schedule(group, args, "lrs")
            log(f"long_alone: {args.long_tokens} tokens, target_pass_s={args.target_pass_s}")
            r["long_alone"] = phase_long(b, group)
            long_s = r["long_alone"]["long_ttft_s"]
            log(f"long_alone: {fmt(long_s)} s in {r['long_alone']['long_passes']} passes")
            save()
        if "mix" in sections:
            lo, hi = short_sizes(args.short_tokens)
            service = service_s or group.cost.predict([((lo + hi) // 2, 0)])
            alone = long_s or group.cost.remaining_s(args.long_tokens, 0)
            if args.long_lead is None:
                args.long_lead = 4 * service
            schedule, info = arrivals(b, service, alone)  # every policy gets this very schedule
            r["mix_schedule"] = {**info, "long_lead_s": args.long_lead, "arrivals": [asdict(x) for x in schedule]}
            log(f"mix schedule: {info['shorts']} shorts at {info['short_rate_per_s']:.2f}/s over "
                f"{info['duration_s']:.1f} s, {info['longs']} long(s) from {args.long_lead:.1f} s")
            for policy in policies:
                use_schedule(group, args, policy)
                log(f"mix ({policy}): {len(schedule)} requests")
                m = phase_mix(b, group, schedule, long_s)
                r.setdefault("mix", {})[policy] = m
                log(f"mix ({policy}): short p50 {fmt(m['short_p50_s'])} s p99 {fmt(m['short_p99_s'])} s, "
                    f"long {fmt(m['long_ttft_s'])} s, errors {m['errors']}, {m['wall_s']:.0f} s")
                save()
        if "long_one_pass" in sections:
            use_schedule(group, args, "lrs", one_pass=True)
            log(f"long_one_pass: {args.long_tokens} tokens in one pass")
            r["long_one_pass"] = phase_long(b, group)
            one_s = r["long_one_pass"]["long_ttft_s"]
            log(f"long_one_pass: {fmt(one_s)} s in {r['long_one_pass']['long_passes']} passes")
            if long_s and one_s:
                r["chunking_overhead"] = long_s / one_s - 1
            save()
    finally:
        group.close()
    save()
    print(table(r))


if __name__ == "__main__":
    main()
