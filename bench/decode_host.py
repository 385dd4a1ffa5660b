"""Host time per decode step on CPU: the real DecodeWorker over a real one-rank DecodeGroup (KVP 1)
and a tiny random model, with every phase of a step timed.

The model forward is the real one (a tiny random Llama with the embedded tokenizer's vocabulary);
it is timed and reported apart from the rest, which is the host work the issue asks about:
planning and block growth, sampling, emitting, and the output stage's text and stream work.

    PYTHONPATH=$PWD python bench/decode_host.py --batch 64 --tokens 64 [--profile out.prof]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from ringserve.config import DecodeConfig
from ringserve.decode_service import worker as worker_module
from ringserve.decode_service.group import DecodeGroup
from ringserve.decode_service.worker import DecodeWorker
from ringserve.engine.config import ModelConfig
from ringserve.engine.kv_cache import KVCache, PagedAttention, SeqSpan
from ringserve.engine.model import Llama
from ringserve.engine.sampling import SamplingParams
from ringserve.engine.tokenizer import Tokenizer
from ringserve.kv_transfer.tcp import send_kv


def tiny_model(vocab: int) -> Llama:
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    )
    return Llama.random(cfg, torch.float32, "cpu", seed=0)


def prompt_kv(model: Llama, ids: list[int]) -> torch.Tensor:
    """The prompt's KV rows [layers, 2, n, Hkv, D], as the prefill tier would send them."""
    cache = KVCache(model.config, num_blocks=-(-len(ids) // 16), block_size=16)
    table = list(range(cache.allocator.num_blocks))
    with torch.inference_mode():
        model(torch.tensor(ids), torch.arange(len(ids)), PagedAttention(cache, [SeqSpan(0, len(ids), table, 0)]))
    layers = range(model.config.num_hidden_layers)
    return torch.stack([torch.stack(cache.read(layer, table, len(ids))) for layer in layers])


class Timed:
    """Wraps a bound method in place and records each call's wall time (the call itself is real)."""

    def __init__(self, obj: object, name: str):
        self.times: list[float] = []
        real = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.times.append(time.perf_counter() - t0)

        setattr(obj, name, timed)


def ms(xs: list[float]) -> str:
    return f"p50 {statistics.median(xs) * 1e3:7.3f} ms  mean {statistics.fmean(xs) * 1e3:7.3f} ms  n {len(xs)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--profile", help="write a cProfile of the decode loop thread's steps here")
    args = p.parse_args()
    torch.set_num_threads(1)

    tokenizer = Tokenizer.from_checkpoint(None)
    model = tiny_model(tokenizer.vocab_size)
    blocks = args.batch * (-(-(args.prompt + args.tokens) // 16) + 2) + 8
    group = DecodeGroup(DecodeConfig(kv_blocks=blocks, block_size=16, kv_transfer="tcp"), model=model)
    worker = DecodeWorker(group, tokenizer, max_batch=args.batch, reservation_ttl_s=600.0)
    step, plan, forward = Timed(worker, "_step"), Timed(worker, "_plan"), Timed(worker, "_forward")
    model_call = Timed(group.rank0, "forward")
    sampling = Timed(worker_module, "sample_batch")
    deliver = Timed(worker.output, "_deliver")
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=args.temperature, stop=args.stop)
    reqs = []
    for i in range(args.batch):
        ids = torch.randint(0, tokenizer.vocab_size, (args.prompt,), generator=gen).tolist()
        res = worker.reserve(f"r{i}", len(ids), args.tokens)
        address = res.targets[0][1]
        send_kv(address, f"r{i}", res.epoch, "t0", [(0, prompt_kv(model, ids))])
        reqs.append(ids)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:  # the loop thread's steps only: wrap _step again, around the timed one
        timed_step = worker._step

        def profiled():
            profiler.enable()
            try:
                return timed_step()
            finally:
                profiler.disable()

        worker._step = profiled
    with worker.lock:  # all start together: every step is a full batch
        started = [worker.start(f"r{i}", args.prompt, ids[-1], params) for i, ids in enumerate(reqs)]
    t0 = time.perf_counter()
    for req in started:
        while (ev := req.events.get(timeout=600)) and not isinstance(ev, Exception) and ev.finish_reason is None:
            pass
    wall = time.perf_counter() - t0
    worker.close()
    # The loop's first _step call began before the wrapping (it waited for requests), and its
    # last one finds none: step k of step.times is call k + 1 of the others.
    n = len(forward.times)
    steps = step.times[: n - 1]
    plans, forwards, models, samples = (t.times[1:] for t in (plan, forward, model_call, sampling))
    prep = [f - m for f, m in zip(forwards, models)]
    rest = [s - p - f - x for s, p, f, x in zip(steps, plans, forwards, samples)]
    print(f"batch {args.batch}, {args.tokens} tokens each, {n} steps, wall {wall:.2f} s")
    print(f"step                 {ms(steps)}")
    print(f"  model forward      {ms(models)}")
    print(f"  sample_batch       {ms(samples)}  (tensor math: device work on a GPU)")
    print(f"  plan (+growth)     {ms(plans)}")
    print(f"  step inputs (rank) {ms(prep)}")
    print(f"  emit/rotate/rest   {ms(rest)}  (and the lock, generators, drop/expire)")
    host = [s - m - x for s, m, x in zip(steps, models, samples)]
    print(f"host per step (step - model forward - sample_batch) {ms(host)}")
    per_step = [sum(deliver.times[i : i + args.batch]) for i in range(0, len(deliver.times), args.batch)]
    print(f"output stage per step (its own thread) {ms(per_step)}")
    if profiler:
        profiler.dump_stats(args.profile)
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
