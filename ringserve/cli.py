"""The `ringserve` command. Stdout carries only generated text; logs and progress go to stderr."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from ringserve.errors import RingserveError

log = logging.getLogger("ringserve")

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face directory (config.json + *.safetensors) or .gguf file; "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and KV cache dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def _sampling_params(args: argparse.Namespace):
    from ringserve.engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from one prompt in this process and print the text as it is produced."""
    import torch

    from ringserve.engine.engine import Engine

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = _sampling_params(args)  # validate before the slow model load
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RingserveError(f"--device {args.device} asked for but no CUDA GPU is visible; use --device cpu")
    log.info("loading model %s", args.model or "(embedded SmolLM2-135M-Instruct)")
    engine = Engine.load(
        args.model, dtype=getattr(torch, args.dtype), device=args.device, prefill_chunk=args.prefill_chunk
    )
    tok = engine.tokenizer
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tok.encode(text, add_special_tokens=False)
    else:
        prompt_ids = tok.encode(prompt)
    t0 = time.perf_counter()
    t_first = None
    n = 0
    reason = None
    for event in engine.generate(prompt_ids, params):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        reason = event.finish_reason
        sys.stdout.write(event.text)
        sys.stdout.flush()
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    decode_rate = (n - 1) / (t_end - t_first) if n > 1 else 0.0
    log.info(
        "prompt %d tokens, first token in %.2f s; %d tokens generated (%.1f tok/s decode); finish: %s",
        len(prompt_ids),
        t_first - t0,
        n,
        decode_rate,
        reason,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringserve", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt in one process")
    gen.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument(
        "--prefill-chunk", type=int, default=None, help="prefill the prompt in chunks of N tokens"
    )
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print a message and exit 2, never a traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except RingserveError as e:
        print(f"ringserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ringserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
