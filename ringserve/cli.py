"""The `ringserve` command. Stdout carries only generated text; logs and progress go to stderr."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

from ringserve.errors import InvalidArgument, RingserveError
from ringserve.logs import setup_logging

log = logging.getLogger("ringserve")

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face directory (config.json + *.safetensors) or .gguf file; "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights and KV cache dtype (auto: bfloat16 on a "
                   "GPU, float32 on CPU)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N")


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


def _read_prompt(arg: str) -> str:
    """The prompt argument, or all of stdin for ``-``."""
    if arg != "-":
        return arg
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"the prompt on stdin is not valid text in the locale's encoding: {e}") from e


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from one prompt in this process and print the text as it is produced."""
    # Every check that needs no model runs first: the load takes seconds.
    params = _sampling_params(args)
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise InvalidArgument(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    prompt = _read_prompt(args.prompt)
    if not prompt:
        raise InvalidArgument("the prompt is empty: give at least one token of text")
    if args.url:
        return _generate_remote(args, prompt, params)
    import torch

    from ringserve.gpu_memory import resolve_device, resolve_dtype
    from ringserve.service import check_device

    device = resolve_device(args.device)
    check_device(device)

    from ringserve.engine.engine import Engine
    from ringserve.engine.weights import resolve_model_path

    resolve_model_path(args.model)  # a missing path is reported before the load is announced
    log.info("loading model %s", args.model or "(embedded SmolLM2-135M-Instruct)")
    engine = Engine.load(
        args.model,
        dtype=getattr(torch, resolve_dtype(args.dtype, device)),
        device=device,
        progress=not args.quiet,
        prefill_chunk=args.prefill_chunk,
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


def _client_tls(args: argparse.Namespace):
    """TLS to the router when --tls-ca is given (with a client certificate if --tls-cert is too)."""
    if not args.tls_ca:
        return None
    from ringserve.tls import ChannelTls

    return ChannelTls(args.tls_ca, args.tls_cert, args.tls_key)


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 if the service at localhost:--port answers a health check on --service as SERVING
    (Kubernetes exec probes: its gRPC probes speak no TLS). TLS from RINGSERVE_TLS_* as the service has it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ringserve import rpc
    from ringserve.config import GrpcArgs, config_from_args
    from ringserve.tls import channel_tls

    tls = channel_tls(config_from_args(GrpcArgs, argparse.Namespace()))
    with rpc.channel(f"localhost:{args.port}", tls=tls) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=args.service), timeout=4)
        except grpc.RpcError as e:
            print(f"ringserve health: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _generate_remote(args: argparse.Namespace, prompt: str, params) -> int:
    """`generate --url`: the same, through a running router (see `ringserve up`)."""
    import grpc

    from ringserve.client import Client

    sampling = dataclasses.asdict(params)  # the API's SamplingParams has the same field names
    inputs = {"messages": [{"role": "user", "content": prompt}]} if args.chat else {"prompt": prompt}
    t0 = time.perf_counter()
    last = None
    try:
        with Client(args.url, api_key=os.environ.get("RINGSERVE_API_KEY"), tls=_client_tls(args)) as client:
            for chunk in client.generate(**inputs, **sampling):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
    except grpc.RpcError as e:
        raise RingserveError(f"{args.url} answered {e.code().name}: {e.details()}") from e
    sys.stdout.write("\n")
    if last is not None:
        log.info(
            "request %s: %d prompt tokens, %d generated in %.2f s",
            last.request_id,
            last.usage.prompt_tokens,
            last.usage.completion_tokens,
            time.perf_counter() - t0,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringserve", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt in one process")
    gen.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--url", default=None, help="send the prompt to a running router (host:port) instead")
    gen.add_argument("--prefill-chunk", type=int, default=None, help="prefill the prompt in chunks of N tokens")
    gen.add_argument("--tls-ca", default=None, help="with --url: the router serves TLS; verify it against this CA file")
    gen.add_argument("--tls-cert", default=None, help="with --tls-ca: a client certificate file, for --tls-client-ca")
    gen.add_argument("--tls-key", default=None, help="key file of --tls-cert")
    # The API key comes from RINGSERVE_API_KEY only: a flag would show it in the process list.
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    health = sub.add_parser("health", help="exit 0 if the local service answers its health check as SERVING")
    health.add_argument("--port", type=int, default=int(os.environ.get("RINGSERVE_PORT", "0")), help="its gRPC port")
    health.add_argument("--service", default="", help="health name, e.g. ringserve.live or ringserve.ready")
    health.set_defaults(func=cmd_health)

    from ringserve.config import add_config_args, config_from_args
    from ringserve.launch import add_service_commands
    from ringserve.planner import PlannerConfig, run
    from ringserve.supervise import add_up_command

    add_service_commands(sub)
    add_up_command(sub)
    planner = sub.add_parser(
        "planner", help="scale the prefill and decode StatefulSets on their load (docs/KUBERNETES.md)"
    )
    add_config_args(planner, PlannerConfig)
    planner.set_defaults(func=lambda args: run(config_from_args(PlannerConfig, args)))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print a message and exit 2, never a traceback."""
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "role", args.command), args.quiet)
    try:
        return args.func(args)
    except RingserveError as e:
        print(f"ringserve: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`ringserve generate ... | head`): stop quietly, and point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("ringserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
