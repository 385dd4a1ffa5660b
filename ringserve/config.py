"""One config object per service, filled from flags or environment variables of the same name.

A flag ``--kv-blocks`` can also be set as ``RINGSERVE_KV_BLOCKS``; the flag wins.

Secrets are never flag values (a process's command line shows in process lists) and never config
values (configs are logged and sent to a group's ranks): a secret field is the path of a file that
holds it (``--redis-password-file``), and the secret may instead be given in the environment variable
of the name without ``_file`` (``RINGSERVE_REDIS_PASSWORD``); ``read_secret`` reads either at use.
The flag of that name (``--redis-password``) is refused with where to put the secret instead, and so
is a URL flag with a password in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ringserve.errors import InvalidArgument


def _env_name(name: str) -> str:
    return "RINGSERVE_" + name.upper()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _refused(flag: str, file_flag: str, env: str):
    """An argparse type that refuses any value of the secret-valued ``flag``."""

    def refuse(_value: str) -> str:
        raise argparse.ArgumentTypeError(
            f"a secret on the command line shows in process lists: put it in a file and pass {file_flag} FILE, "
            f"or set {env}"
        )

    return refuse


def url_without_password(flag: str, instead: str):
    """An argparse type for a URL flag: refused if the URL carries a password (redis://:PASSWORD@host),
    saying where to give it ``instead``."""

    def check(value: str) -> str:
        if urlsplit(value).password is not None:
            raise argparse.ArgumentTypeError(
                f"a password in the URL of {flag} shows in process lists: leave it out and {instead}"
            )
        return value

    return check


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field, with help from the field's metadata; for each secret file
    field, its secret-valued twin (``--redis-password`` beside ``--redis-password-file``) refused."""
    for f in dataclasses.fields(cls):
        flag = _flag(f.name)
        default = f.default
        kind = f.metadata.get("type", type(default) if default is not None else str)
        help_text = f"{f.metadata.get('help', '')} (env {_env_name(f.name)}; default {default!r})"
        if f.metadata.get("secret"):
            secret = f.name.removesuffix("_file")
            parser.add_argument(
                _flag(secret), type=_refused(_flag(secret), flag, _env_name(secret)), help=argparse.SUPPRESS
            )
            help_text = f"{f.metadata['help']} (env {_env_name(f.name)}; or the secret in env {_env_name(secret)})"
        if f.metadata.get("url"):
            parser.add_argument(flag, type=url_without_password(flag, f.metadata["url"]), default=None, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            parser.add_argument(flag, default=None, help=help_text + "; comma-separated")
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def config_from_args(cls: type, args: argparse.Namespace):
    """Flag if given, else environment variable, else the field's default."""
    values = {}
    for f in dataclasses.fields(cls):
        default = f.default
        kind = f.metadata.get("type", type(default) if default is not None else str)
        raw = getattr(args, f.name, None)
        if raw is None and _env_name(f.name) in os.environ:
            raw = os.environ[_env_name(f.name)]
            try:
                if kind is bool:
                    raw = raw.lower() in ("1", "true", "yes", "on")
                elif kind is not list:
                    raw = kind(raw)
            except ValueError as e:
                raise InvalidArgument(f"{_env_name(f.name)}={raw!r} is not a valid {kind.__name__}") from e
        if kind is list and isinstance(raw, str):
            raw = [x.strip() for x in raw.split(",") if x.strip()]
        values[f.name] = default if raw is None else raw
    return cls(**values)


def read_secret(path: str | None, env: str, flag: str) -> bytes | None:
    """A secret from the file ``path`` (``flag``'s value), else from the environment variable ``env``,
    else None; surrounding whitespace dropped. Never logged."""
    if path:
        try:
            with open(path, "rb") as f:
                return f.read().strip()
        except OSError as e:
            raise InvalidArgument(f"cannot read {flag} {path!r}: {e.strerror}") from e
    return os.environ.get(env, "").strip().encode() or None


def _opt(default, help: str, type=None, **flags):
    """A config field; ``flags``: ``url="..."`` (a URL whose flag takes no password: say where it goes
    instead), ``secret=True`` (the file of a secret)."""
    return field(default=default, metadata={"help": help, **({"type": type} if type else {}), **flags})


# 10M-token contexts: token ids travel as packed varints (3 bytes each for vocabularies up to 2M,
# 5 at most), text at ~4 bytes a token; 64 MiB carries either (gRPC's default is 4 MiB).
MAX_MESSAGE_MB = 64


@dataclass
class GrpcArgs:
    """What every gRPC server takes: how much concurrent work it admits, and how large a message."""

    max_concurrent_requests: int = _opt(
        256,
        "most concurrent streams and prefills this server runs; more are refused with RESOURCE_EXHAUSTED "
        "(health and control calls have threads of their own)",
    )
    max_message_mb: int = _opt(MAX_MESSAGE_MB, "largest gRPC message sent or received, in MiB (prompts of 10M tokens)")
    tls_cert: str | None = _opt(None, "this service's TLS certificate (PEM; its role as a SPIFFE URI SAN)", str)
    tls_key: str | None = _opt(None, "key of --tls-cert (PEM file)", str)
    tls_ca: str | None = _opt(None, "the deployment CA (PEM file): peers' certificates must chain to it", str)
    insecure: bool = _opt(False, "allow plaintext gRPC on a non-loopback address (said in the log)")


@dataclass
class ModelArgs:
    """What every model-serving service needs to load its model."""

    model: str | None = _opt(None, "HF directory or .gguf file; empty: the embedded default", str)
    dtype: str = _opt(
        "auto", "weights and KV cache dtype: auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16, float16"
    )
    load_format: str = _opt(
        "auto", "auto: load the weights; dummy: random weights of --model's config.json shape (benchmarks)"
    )
    device: str = _opt("auto", "auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N")
    host: str = _opt("127.0.0.1", "address to listen on")
    advertise_host: str | None = _opt(None, "address peers use to reach this process (default: --host)", str)
    metrics_port: int | None = _opt(None, "serve Prometheus /metrics on this port", int)

    def __post_init__(self) -> None:
        from ringserve.gpu_memory import resolve_device, resolve_dtype

        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)


@dataclass
class RedisArgs:
    """Where the registry and residency live: every service of one deployment uses the same Redis and cluster."""

    redis_url: str = _opt(
        "redis://127.0.0.1:6379/0",
        "Redis for the registry and residency (rediss:// for TLS; no password in it); `up` embeds one",
        url="give it in --redis-password-file or RINGSERVE_REDIS_PASSWORD",
    )
    redis_password_file: str | None = _opt(None, "file with the Redis password", str, secret=True)
    redis_ca_cert: str | None = _opt(
        None, "CA file that signed the Redis server's TLS certificate (with a rediss:// URL)", str
    )
    redis_client_cert: str | None = _opt(
        None, "client certificate file for Redis TLS, for a Redis that requires one (tls-auth-clients)", str
    )
    redis_client_key: str | None = _opt(None, "key file of --redis-client-cert", str)
    cluster: str = _opt("ringserve", "deployment name: the key namespace in Redis, shared by its router and groups")


@dataclass
class WorkerArgs(ModelArgs, RedisArgs, GrpcArgs):
    """What prefill and decode groups share: loading a model, and their entry in the registry."""

    heartbeat_s: float = _opt(1.0, "seconds between registry heartbeats (load, residency, TTL renewal)")
    registry_ttl_s: float = _opt(10.0, "a group that misses heartbeats for this long drops out of the registry")
    drain_timeout_s: float = _opt(120.0, "on SIGTERM, wait this long at most for running requests to finish")
    kv_transfer: str = _opt("auto", "KV transport: auto (NIXL if it works here, else TCP), nixl or tcp")
    tp: int = _opt(
        1,
        "tensor-parallel ranks per CP (or KVP) rank: the group has tp x cp (or tp x kvp) ranks, one process "
        "and device each",
    )
    deployment_secret_file: str | None = _opt(
        None,
        "file with the secret that keys the MACs of KV landings and TCP KV frames and the rank link, the same "
        "on both tiers",
        str,
        secret=True,
    )
    group_host: str = _opt(
        "127.0.0.1",
        "the group leader's address for its other ranks (rank link and torch.distributed rendezvous); "
        "every rank's host must reach it",
    )
    group_port: int = _opt(0, "the leader's rank-link port (0: pick a free one; set it when ranks run on other hosts)")
    local_ranks: int | None = _opt(
        None,
        "ranks this process runs (itself included, one device each): the leader ranks 0..L-1 (default: all), "
        "a process with --group-rank R ranks R*L..R*L+L-1 (default 1: rank R)",
        int,
    )
    group_rank: int | None = _opt(
        None,
        "join the group whose leader is at --group-leader as its R-th block of --local-ranks ranks (1..); "
        "serves no gRPC",
        int,
    )
    group_leader: str | None = _opt(
        None, "HOST:PORT of the group leader's rank link (its --group-host/--group-port)", str
    )
    gpu_memory_fraction: float = _opt(
        0.9, "with --kv-blocks 0 on a GPU: share of its memory this service uses (weights, working memory, KV pool)"
    )


@dataclass
class DecodeConfig(WorkerArgs):
    port: int = _opt(50061, "gRPC port (0: pick a free one)")
    kv_port: int = _opt(0, "TCP port of the KV receiver (0: pick a free one)")
    kv_blocks: int = _opt(0, "KV cache blocks per rank (0: from --gpu-memory-fraction on a GPU, 512 on CPU)")
    block_size: int = _opt(64, "tokens per KV block")
    max_batch: int = _opt(64, "most requests decoded in one step")
    reservation_ttl_s: float = _opt(
        120.0, "a reservation's lease: it expires unless claimed or renewed (Decode.Renew) within this many seconds"
    )
    quarantine_timeout_s: float = _opt(
        600.0, "blocks a NIXL WRITE may still reach after their reservation ended are freed after this at the latest"
    )
    kv_idle_timeout_s: float = _opt(60.0, "the KV receiver closes a TCP connection idle for this many seconds")
    kvp: int = _opt(1, "KV-parallel ranks in this decode group (one process and device each)")
    shard_tokens: int = _opt(32768, "a request spreads its KV over one more rank per this many tokens")
    group_timeout_s: float = _opt(120.0, "how long ranks wait for each other before failing")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_blocks == 0:
            self.kv_blocks = _pool_blocks(self, 512, self.max_batch, self.max_batch, 2 * self.max_batch, "decode")


@dataclass
class PrefillConfig(WorkerArgs):
    port: int = _opt(50051, "gRPC port of the group leader (0: pick a free one)")
    cp: int = _opt(2, "context-parallel ranks in this group (one process each)")
    kv_blocks: int = _opt(0, "KV cache blocks per rank (0: from --gpu-memory-fraction on a GPU, 256 on CPU)")
    block_size: int = _opt(64, "tokens per KV block")
    strategy: str = _opt("auto", "ring attention variant: auto, pass_kv or pass_q")
    prefix_cache: float = _opt(
        1.0, "share of each rank's KV blocks the prefix cache may keep between requests, 0 to 1 (0: off)"
    )
    group_timeout_s: float = _opt(120.0, "how long ranks wait for each other before failing")
    schedule: str = _opt("lrs", "order of prefill work: lrs (least remaining slack first) or fcfs")
    target_pass_s: float = _opt(0.25, "a scheduler pass (one chunk, or several packed) should take about this long")
    max_pass_overhead: float = _opt(
        0.05, "but no pass so small that its fixed costs exceed this share of it (this wins over --target-pass-s)"
    )
    max_pass_tokens: int = _opt(65536, "most new tokens in one pass, all its requests together (activation memory)")
    ttft_min_s: float = _opt(1.0, "default time-to-first-token deadline: at least this many seconds")
    ttft_factor: float = _opt(3.0, "... or this many times the request's predicted prefill time alone, if more")
    reject_late: bool = _opt(False, "refuse (DEADLINE_EXCEEDED) requests that cannot meet their deadline")
    calibrate_tokens: int = _opt(
        0, "largest pass timed at start to fit the scheduler's cost model (0: 32768 on a GPU, 2048 on CPU)"
    )
    kv_push_timeout_s: float = _opt(30.0, "a KV push to a decode rank that does not complete in this long fails")
    recalibrate: bool = _opt(
        False, "time the calibration passes even if timings for this model, layout and device are stored"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibrate_tokens == 0:
            self.calibrate_tokens = 32768 if self.device.startswith("cuda") else 2048
        if self.kv_blocks == 0:
            per_rank = -(-self.max_pass_tokens // max(1, self.cp))  # a pass's tokens on one rank
            min_blocks = -(-per_rank // self.block_size)
            self.kv_blocks = _pool_blocks(self, 256, per_rank, 16, min_blocks, "prefill")


def _pool_blocks(
    cfg: WorkerArgs, cpu_blocks: int, work_tokens: int, logits_rows: int, min_blocks: int, what: str
) -> int:
    """``--kv-blocks 0``: ``cpu_blocks`` on CPU; on a GPU what ``--gpu-memory-fraction`` leaves."""
    if not cfg.device.startswith("cuda"):
        return cpu_blocks
    from ringserve.gpu_memory import gpu_pool_blocks

    return gpu_pool_blocks(
        cfg.device, cfg.model, cfg.dtype, cfg.block_size, cfg.gpu_memory_fraction, work_tokens, logits_rows,
        min_blocks, what, cfg.tp,
    )  # fmt: skip


@dataclass
class RouterConfig(RedisArgs, GrpcArgs):
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(50050, "gRPC port (0: pick a free one)")
    http_port: int | None = _opt(None, "serve the OpenAI-compatible HTTP API on this port (0: pick a free one)", int)
    policy: str = _opt("cache_aware", "prefill group choice: cache_aware, least_loaded or round_robin")
    refresh_s: float = _opt(0.5, "seconds between reads of the registry: groups and their load")
    model: str | None = _opt(None, "checkpoint for the tokenizer (must match the workers' model)", str)
    metrics_port: int | None = _opt(None, "serve Prometheus /metrics on this port", int)
    ready_timeout_s: float = _opt(300.0, "how long to wait at start for a prefill and a decode group to register")
    drain_timeout_s: float = _opt(30.0, "on SIGTERM, refuse new requests and let running ones finish for this long")
    migration_limit: int = _opt(1, "times a stream may move to another decode group when its own dies (0: never)")
    tls_client_ca: str | None = _opt(
        None, "require client certificates signed by this CA (PEM file) on the client port (needs --tls-cert)", str
    )
    api_keys_file: str | None = _opt(
        None, "API keys clients must send as `authorization: Bearer <key>` (file re-read on change; see README)", str
    )
