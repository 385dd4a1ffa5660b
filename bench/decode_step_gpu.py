"""Check and time the decode step of two versions of ringserve on the same inputs: whichever
``ringserve`` is on PYTHONPATH runs (this file adds nothing to sys.path but its own folder).

    PYTHONPATH=<new code> python bench/decode_step_gpu.py --out $OUT/new.pt
    PYTHONPATH=<old code> python bench/decode_step_gpu.py --out $OUT/old.pt --compare $OUT/new.pt

The Llama-3-8B shape with random bf16 weights (seed 0) over random KV (seeded). Check: B requests,
``--steps`` steps of ``KVPRank.step`` (CUDA graphs) teacher-forced with the same token ids, so
every step of both versions sees the same inputs; per step the greedy tokens (``sample_batch``),
the top-2 margins, and the logits of the first rows. ``--compare`` reports how many greedy tokens
agree, the largest logit difference, and each disagreement's margin (a near tie or not). Time:
the step at each of ``--batches`` over ``--context``-token contexts, device time of steps back to
back (CUDA events) and wall time of step + sampling + the host copy, beside the HBM floor
((weights + KV read) / the measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from shapes import LLAMA3_8B  # noqa: E402

from ringserve.decode_service.kvp import KVPRank, StepEntry  # noqa: E402
from ringserve.engine.config import ModelConfig  # noqa: E402
from ringserve.engine.kv_cache import KVCache, blocks_needed  # noqa: E402
from ringserve.engine.model import Llama  # noqa: E402
from ringserve.engine.sampling import SamplingParams, sample_batch  # noqa: E402

BLOCK = 64
ROWS_KEPT = 8  # requests whose whole logits are saved


def setup(model: Llama, batch: int, context: int, steps: int) -> KVPRank:
    """A rank with ``batch`` requests of ``context`` tokens of random KV, room for ``steps`` more."""
    dev = model.model.norm.weight.device
    per_seq = blocks_needed(context + steps, BLOCK)
    cache = KVCache(model.config, batch * per_seq, BLOCK, dtype=model.model.norm.weight.dtype, device=dev)
    g = torch.Generator(device=dev).manual_seed(1)
    for layer in range(cache.k.shape[0]):
        cache.k[layer].normal_(generator=g)
        cache.v[layer].normal_(generator=g)
    rank = KVPRank(model, cache, 0, 1)
    for i in range(batch):
        rank.reserve(f"r{i}", 1, cache.allocator.allocate(per_seq), 0, context)
    return rank


def entries(batch: int, context: int, s: int, vocab: int) -> list[StepEntry]:
    """Step ``s``'s inputs: fixed token ids (the same in every version), the next positions."""
    return [StepEntry(f"r{i}", (1000 + 7919 * i + 104729 * s) % vocab, context + s, 0) for i in range(batch)]


def check(model: Llama, batch: int, context: int, steps: int) -> dict:
    rank, vocab = setup(model, batch, context, steps), model.config.vocab_size
    params = [SamplingParams(max_tokens=1 << 20, ignore_eos=True)] * batch
    tokens, margins, logits_kept = [], [], []
    for s in range(steps):
        logits = rank.step(entries(batch, context, s, vocab), group_wide=False)
        picks = sample_batch(logits, params, [None] * batch)
        top = logits.topk(2, dim=-1).values
        tokens.append(picks[:, 0].cpu())
        margins.append((top[:, 0] - top[:, 1]).cpu())
        logits_kept.append(logits[:ROWS_KEPT].cpu())
    return {"tokens": torch.stack(tokens), "margins": torch.stack(margins), "logits": torch.stack(logits_kept)}


def compare(a: dict, b: dict) -> dict:
    same = a["tokens"] == b["tokens"]
    diff = (a["logits"] - b["logits"]).abs()
    worst = diff.max().item()
    ties = [a["margins"][s, i].item() for s, i in (~same).nonzero().tolist()]
    return {
        "tokens_equal": int(same.sum()),
        "tokens": same.numel(),
        "first_step_equal": int(same[0].sum()),
        "logits_max_abs_diff": worst,
        "logits_mean_abs_diff": diff.mean().item(),
        "logits_max_abs": a["logits"].abs().max().item(),
        "disagreement_margins": ties,
        "disagreements_within_2x_max_diff": sum(m <= 2 * worst for m in ties),
    }


def timing(model: Llama, batch: int, context: int, iters: int, gbps: float) -> dict:
    rank, vocab = setup(model, batch, context, 2 * iters + 8), model.config.vocab_size
    params = [SamplingParams(max_tokens=1 << 20, ignore_eos=True)] * batch
    s = iter(range(1 << 20))

    def step():
        return rank.step(entries(batch, context, next(s), vocab), group_wide=False)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        step()
    b.record()
    torch.cuda.synchronize()
    walls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sample_batch(step(), params, [None] * batch).tolist()
        walls.append(time.perf_counter() - t0)
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = batch * (context + iters) * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2
    floor_ms = (weights + kv) / gbps / 1e6
    device_ms = a.elapsed_time(b) / iters
    wall_ms = statistics.median(walls) * 1e3
    return {"batch": batch, "context": context, "step_device_ms": device_ms, "floor_ms": floor_ms,
            "x_floor": device_ms / floor_ms, "step_sample_copy_wall_ms_p50": wall_ms}  # fmt: skip


def copy_gbps() -> float:
    """HBM bandwidth of a device copy, (read + write) / time."""
    x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        y.copy_(x)
    b.record()
    torch.cuda.synchronize()
    return 2 * (4 << 30) * 10 / (a.elapsed_time(b) / 1e3) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the check's results (torch.save); the timings beside it (.json)")
    p.add_argument("--compare", default=None, help="a file another version wrote: compare with it")
    p.add_argument("--batch", type=int, default=64, help="requests of the check")
    p.add_argument("--context", type=int, default=192, help="tokens of context per request")
    p.add_argument("--steps", type=int, default=8, help="steps of the check")
    p.add_argument("--batches", default="1,64,128", help="batch sizes timed")
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    torch.cuda.set_device(0)
    gbps = copy_gbps()
    model = Llama.random(ModelConfig.from_hf(LLAMA3_8B), torch.bfloat16, torch.device("cuda", 0), 0)
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "copy_gbps": gbps}
    with torch.inference_mode():
        r = check(model, args.batch, args.context, args.steps)
        torch.save(r, args.out)
        if args.compare:
            result["compare"] = compare(r, torch.load(args.compare))
        result["timing"] = [timing(model, int(b), args.context, args.iters, gbps) for b in args.batches.split(",")]
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
