"""Is the prefill scheduler's calibration stable? Start the real services several times (as
bench/serve_gpu.py starts them: both tiers on one GPU, so the decode tier starts beside the prefill
group's calibration), read each start's fitted cost model from the prefill log, and plan one long
prompt alone with it (the chunk sizes the scheduler would pick, from the model's predictions).

    python bench/calibration_gpu.py --starts 2 --tokenizer-dir /tmp/tok --out $OUT/calibration.json

The same service on the same GPU should plan the same chunking at every start.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_gpu import PASSES, model_dir, prom_counters  # noqa: E402

from ringserve.launch import start_cluster  # noqa: E402
from ringserve.prefill_service.cost_model import CostModel  # noqa: E402
from ringserve.prefill_service.scheduler import Scheduler, SchedulerConfig  # noqa: E402

COST_LINE = re.compile(
    r"prefill cost model: CostModel\(fixed=([\d.]+) ms, per_sequence=([\d.]+) ms, per_token=([\d.]+) us, "
    r"per_token_pair=([\d.]+) ns"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class UpCluster:
    """`ringserve up` as a new user runs it (no device, dtype or pool flags), in a child process."""

    def __init__(self, args, log_path: Path):
        cmd = [sys.executable, "-m", "ringserve.cli", "up", "--cp", "1", "--model", args.model, "--load-format",
               args.load_format, "--port", "0", "--http-port", "0", "--redis-port", "0",
               *shlex.split(args.up_args)]  # fmt: skip
        self.log_path = log_path
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True)
        deadline = time.monotonic() + 900
        while "ringserve is up" not in log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"`up` did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        self.router = self.proc.stdout.readline().strip()
        found = re.search(r"prefill http://([\w.:-]+)/metrics", log_path.read_text())
        self.metrics = {"prefill": found.group(1)} if found else {}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_start(args, i: int) -> dict:
    log_dir = Path(args.log_dir, f"start{i}")
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.up:
        return finish_start(args, i, UpCluster(args, log_dir / "up.log"), log_dir / "up.log", t0)
    extra = {"prefill": ["--load-format", args.load_format, *shlex.split(args.prefill_args)],
             "decode": ["--load-format", args.load_format, *shlex.split(args.decode_args)]}  # fmt: skip
    cluster = start_cluster(cp=1, kvp=1, model=args.model, dtype=args.dtype, extra=extra, ready_timeout_s=900,
                            log_dir=str(log_dir), metrics=True)  # fmt: skip
    return finish_start(args, i, cluster, log_dir / "prefill.log", t0)


def finish_start(args, i: int, cluster, log_path: Path, t0: float) -> dict:
    """Serve the prompts (with --run), stop, read the fitted cost model from the log and plan with it."""
    ready_s = time.monotonic() - t0
    served = {}
    try:
        if args.run:
            served = {n: serve_one(cluster, n, i) for n in args.lengths}
    finally:
        cluster.stop()
    text = log_path.read_text()
    found = COST_LINE.findall(text)
    if not found:
        raise SystemExit(f"start {i}: no cost model line in {log_path}")
    fixed, per_seq, per_token, per_pair = (float(x) for x in found[-1])
    coefficients = (fixed * 1e-3, per_seq * 1e-3, per_token * 1e-6, per_pair * 1e-9)
    pools = [line.split("INFO", 1)[-1].strip() for line in text.splitlines() if "KV pool of" in line]
    r = {"start": i, "ready_s": ready_s, "cost_model": coefficients, "served": served, "pools": pools, "plans": {}}
    for n in args.lengths:
        sched = Scheduler(SchedulerConfig(chunk_unit=64), CostModel(prior=coefficients).frozen())
        sched.add("long", n, 0, now=0.0)
        chunks = []
        while sched.requests:
            plan = sched.next_pass(0.0)
            chunks.append(plan[0].num_tokens)
            sched.pass_done(plan, sched.cost.predict([(c.num_tokens, c.start) for c in plan]), 0.0)
        r["plans"][n] = {"passes": len(chunks), "predicted_s": CostModel(prior=coefficients).remaining_s(n, 0),
                         "chunks": chunks}  # fmt: skip
    log(f"start {i}: ready in {ready_s:.0f} s, cost model {coefficients}, passes "
        f"{ {n: p['passes'] for n, p in r['plans'].items()} }")  # fmt: skip
    return r


def serve_one(cluster, n: int, start: int) -> dict:
    """One prompt of ``n`` random tokens through the router: TTFT and the prefill passes it took."""
    import random

    from ringserve.client import Client

    before = prom_counters(cluster.metrics.get("prefill"), PASSES)
    with Client(cluster.router, timeout=600) as c:
        vocab = c.model_info().model.vocab_size
        rng = random.Random(1000 * start + n)
        t0 = time.perf_counter()
        stream = c.generate(token_ids=[rng.randrange(vocab) for _ in range(n)], max_tokens=1, ignore_eos=True)
        next(stream)
        ttft = time.perf_counter() - t0
        for _ in stream:
            pass
    after = prom_counters(cluster.metrics.get("prefill"), PASSES)
    r = {"ttft_s": ttft, "passes": after[PASSES[0]] - before[PASSES[0]], "pass_s": after[PASSES[1]] - before[PASSES[1]]}
    log(f"start {start}: {n} tokens served: {r}")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--starts", type=int, default=2)
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default=None)
    p.add_argument("--tokenizer-dir", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prefill-args", default="")
    p.add_argument("--decode-args", default="")
    p.add_argument("--up", action="store_true", help="start the services with `ringserve up` and its defaults")
    p.add_argument("--up-args", default="", help="more flags for `ringserve up`")
    p.add_argument("--run", action="store_true", help="also serve one prompt of each length through the router")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="calibration-logs-")
    model_dir(args)
    starts = [one_start(args, i) for i in range(args.starts)]
    r = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "args": vars(args), "starts": starts}
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1))
    for s in starts:
        fixed, per_seq, per_token, per_pair = s["cost_model"]
        print(
            f"start {s['start']}: fixed {fixed * 1e3:.1f} ms, per seq {per_seq * 1e3:.1f} ms, per token "
            f"{per_token * 1e6:.2f} us, per pair {per_pair * 1e9:.3f} ns; planned passes "
            + ", ".join(f"{n}: {pl['passes']}" for n, pl in s["plans"].items())
            + "; served "
            + ", ".join(f"{n}: {v['passes']:.0f} passes {v['ttft_s']:.2f} s" for n, v in s["served"].items())
        )


if __name__ == "__main__":
    main()
