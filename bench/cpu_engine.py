"""CPU benchmark: ringserve's single-process Engine against Hugging Face transformers, same weights.

    python bench/cpu_engine.py                       # fp32 and bf16, 2 threads, median of 5
    python bench/cpu_engine.py --dtypes float32 --repeats 3 --threads 4

Model: the embedded default, SmolLM2-135M-Instruct (GGUF Q4_1, dequantized). transformers loads
the very checkpoint ringserve loads: the Hugging Face directory (config.json + model.safetensors)
that ringserve writes when it converts the GGUF, with ``LlamaForCausalLM.from_pretrained(dir,
dtype=...)`` and its default attention (sdpa). A check that both greedy-decode the same tokens
(fp32) guards the "same weights, same model" claim.

Phases (prompts are fixed pseudo-random token ids, so their length is exact):
  prefill-512, prefill-2048  tokens/s = prompt tokens / time from the call until the first token
                             is sampled. ringserve: ``Engine.generate(ids, max_tokens=1)`` run to
                             the end (KV blocks allocated, written, freed). transformers: one
                             forward with a fresh ``DynamicCache`` (the KV cache is built too),
                             ``logits_to_keep=1``, then argmax.
  decode-64                  tokens/s = 64 / time of 64 decode steps at batch 1, greedy, after the
                             512-token prompt (prefill excluded). ringserve: the time between the
                             first and the 65th event of ``Engine.generate(..., max_tokens=65,
                             ignore_eos=True)``; each step includes sampling and streaming
                             detokenization. transformers: a bare loop of ``model(next_token,
                             past_key_values=cache)`` + argmax, with no ``generate()`` machinery
                             (logits processors, stopping criteria): if anything, this favours
                             transformers.

Fairness: one process, the same torch thread count (``torch.set_num_threads``) for both, the same
dtype for weights and KV cache, inference mode for both. Each measurement is ``--warmup`` untimed
runs, then ``--repeats`` timed runs with ringserve and transformers alternating run by run (so
machine noise hits both alike); the median is reported. Progress goes to stderr, the table (markdown)
to stdout.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ringserve.engine.engine import Engine
from ringserve.engine.model import Llama
from ringserve.engine.sampling import SamplingParams
from ringserve.engine.tokenizer import Tokenizer
from ringserve.engine.weights import default_model_path, gguf_cache_dir, load_weights

PREFILL_LENGTHS = (512, 2048)
DECODE_PROMPT = 512
DECODE_TOKENS = 64


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompt_ids(n: int, vocab: int) -> list[int]:
    """Fixed pseudo-random ids, avoiding the low ids where the special tokens live."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab, (n,), generator=g).tolist()


# -- ringserve ------------------------------------------------------------------------------------


def ours_prefill(engine: Engine, ids: list[int]) -> float:
    start = time.perf_counter()
    events = list(engine.generate(ids, SamplingParams(max_tokens=1)))
    elapsed = time.perf_counter() - start
    assert len(events) == 1
    return elapsed


def ours_decode(engine: Engine, ids: list[int], n: int) -> tuple[float, list[int]]:
    """Seconds for n decode steps after the first token, and the n + 1 tokens."""
    tokens, t_first = [], 0.0
    for event in engine.generate(ids, SamplingParams(max_tokens=n + 1, ignore_eos=True)):
        tokens.append(event.token_id)
        if len(tokens) == 1:
            t_first = time.perf_counter()
    return time.perf_counter() - t_first, tokens


# -- transformers ---------------------------------------------------------------------------------


def hf_prefill(model, ids: list[int]) -> float:
    from transformers import DynamicCache

    with torch.inference_mode():
        start = time.perf_counter()
        out = model(torch.tensor([ids]), past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        int(out.logits[0, -1].argmax())
        return time.perf_counter() - start


def hf_decode(model, ids: list[int], n: int) -> tuple[float, list[int]]:
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = [int(out.logits[0, -1].argmax())]
        start = time.perf_counter()
        for _ in range(n):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
        return time.perf_counter() - start, tokens


# -- measurement ----------------------------------------------------------------------------------


def measure(label: str, ours: Callable[[], float], theirs: Callable[[], float], warmup: int, repeats: int):
    """Median seconds of each, after warm-up; the two alternate so noise hits both alike."""
    for _ in range(warmup):
        ours()
        theirs()
    a, b = [], []
    for i in range(repeats):
        a.append(ours())
        b.append(theirs())
        progress(f"  {label}: run {i + 1}/{repeats}: ringserve {a[-1]:.3f} s, transformers {b[-1]:.3f} s")
    return statistics.median(a), statistics.median(b)


def load_pair(dtype: torch.dtype):
    """(Engine, transformers model) on the same converted checkpoint, in ``dtype``."""
    from transformers import LlamaForCausalLM

    config, state = load_weights(None, dtype=dtype, progress=False)
    engine = Engine(Llama.from_state_dict(config, state), Tokenizer.from_checkpoint(None))
    hf_dir = gguf_cache_dir(default_model_path())  # written by load_weights on the first load
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    ours_w = engine.model.model.layers[7].mlp.up_proj.weight
    assert torch.equal(ours_w, hf.model.layers[7].mlp.up_proj.weight), "weights differ"
    return engine, hf


def bench_dtype(name: str, warmup: int, repeats: int) -> list[tuple[str, str, float, float]]:
    """Rows (phase, dtype, ringserve tok/s, transformers tok/s) for one dtype."""
    dtype = getattr(torch, name)
    progress(f"loading both models in {name}")
    engine, hf = load_pair(dtype)
    vocab = engine.config.vocab_size
    rows = []
    for n in PREFILL_LENGTHS:
        ids = prompt_ids(n, vocab)
        progress(f"{name} prefill {n}")
        a, b = measure(
            f"prefill-{n}",
            functools.partial(ours_prefill, engine, ids),
            functools.partial(hf_prefill, hf, ids),
            warmup,
            repeats,
        )
        rows.append((f"prefill-{n}", name, n / a, n / b))

    ids = prompt_ids(DECODE_PROMPT, vocab)
    got = {}

    def ours_run() -> float:
        seconds, got["ours"] = ours_decode(engine, ids, DECODE_TOKENS)
        return seconds

    def hf_run() -> float:
        seconds, got["hf"] = hf_decode(hf, ids, DECODE_TOKENS)
        return seconds

    progress(f"{name} decode {DECODE_TOKENS} after {DECODE_PROMPT}")
    a, b = measure(f"decode-{DECODE_TOKENS}", ours_run, hf_run, warmup, repeats)
    rows.append((f"decode-{DECODE_TOKENS}", name, DECODE_TOKENS / a, DECODE_TOKENS / b))
    same = sum(x == y for x, y in zip(got["ours"], got["hf"]))
    progress(f"{name}: greedy tokens agree on {same}/{DECODE_TOKENS + 1}")
    if dtype == torch.float32 and same != DECODE_TOKENS + 1:
        progress("*** fp32 greedy tokens differ: the two models do not compute the same thing")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    progress(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    rows = [row for name in args.dtypes.split(",") for row in bench_dtype(name, args.warmup, args.repeats)]

    print("| phase | dtype | ringserve tok/s | transformers tok/s | ringserve / transformers |")
    print("|---|---|---:|---:|---:|")
    phases = [f"prefill-{n}" for n in PREFILL_LENGTHS] + [f"decode-{DECODE_TOKENS}"]
    for phase, name, ours, theirs in sorted(rows, key=lambda r: phases.index(r[0])):
        print(f"| {phase} | {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
