"""The push stage of a prefill rank: a finished request's KV shard goes to its decode targets on
threads of its own, so a slow or stuck decode rank delays only that request, never the next pass.

``run_pass`` hands each request whose last chunk it ran to ``Pusher.submit``; the rank keeps the
request's blocks until the leader's next pass says what to keep (``Pass.finish``), which it
sends only after every rank's ``PushResult`` is in. A failed push fails only its request, with
ABORTED naming the decode target: the decode side's fault, not the prefill group's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ringserve.engine.kv_cache import KVCache
from ringserve.engine.tp import kv_heads
from ringserve.errors import Aborted, InvalidArgument, RingserveError
from ringserve.kv_transfer.nixl import NixlEndpoint
from ringserve.kv_transfer.plan import HeadMove, Want, check_wants, plan_layout
from ringserve.kv_transfer.tcp import row_slices, send_kv
from ringserve.prefill_service.context_parallel import CPRunner, CPSequence

log = logging.getLogger(__name__)

PUSH_THREADS = 4  # pushes to different decode ranks in flight at once on one prefill rank


@dataclass(frozen=True)
class Target:
    """A decode rank's share of a request's prompt KV: rows [first_position, + num_tokens) of the
    KV heads ``kv_heads`` (global indices; None: every head, a decode rank of TP 1)."""

    address: str
    first_position: int
    num_tokens: int
    nixl_landing: bytes = b""  # empty: the decode rank takes this share over TCP only
    epoch: int = 0  # the decode reservation's epoch (TCP frames carry it)
    kv_heads: range | None = None

    @classmethod
    def from_proto(cls, t) -> Target:
        """From a ``KVTarget`` (``kv_heads`` 0: every head)."""
        heads = range(t.first_kv_head, t.first_kv_head + t.kv_heads) if t.kv_heads else None
        return cls(t.address, t.first_position, t.num_tokens, t.nixl_landing, t.epoch, heads)


@dataclass(frozen=True)
class SourceRank:
    """Where a prefill rank sits in its group's layout: CP rank ``cp_rank`` (its ring position),
    TP rank ``tp_rank`` of ``tp``, of a model with ``num_kv_heads`` KV heads (global); it holds
    ``engine.tp.kv_heads(tp_rank, tp, num_kv_heads)``."""

    cp_rank: int
    num_kv_heads: int
    tp_rank: int = 0
    tp: int = 1


@dataclass
class PushResult:
    """What one rank reports for one finished request: bytes pushed, or the error that stopped it."""

    rank: int
    request_id: str
    bytes_sent: int = 0
    transfer_s: float = 0.0
    error: tuple[str, str] | None = None  # (status code name, message)


def _wants(targets: Sequence[Target], num_kv_heads: int) -> list[Want]:
    every = range(num_kv_heads)
    return [Want(t.first_position, t.num_tokens, every if t.kv_heads is None else t.kv_heads) for t in targets]


def check_targets(targets: Sequence[Target], prompt_tokens: int, num_kv_heads: int) -> None:
    """Raise InvalidArgument unless the targets want every KV head of every prompt token (each
    decode replica of a head once), inside the prompt and the model's KV heads."""
    try:
        if not targets:
            raise ValueError("there are none")
        check_wants(prompt_tokens, num_kv_heads, _wants(targets, num_kv_heads))
    except ValueError as e:
        raise InvalidArgument(
            f"targets must cover every prompt token's KV heads exactly once (from Decode.Reserve): {e}"
        ) from e


def push_kv(
    cache: KVCache,
    block_table: Sequence[int],
    request_id: str,
    targets: Sequence[Target],
    counts: list[int],
    source: SourceRank,
    endpoint: NixlEndpoint | None,
    timeout_s: float,
    frame_key: bytes | None = None,
) -> int:
    """Send this rank's KV rows (its ``cache`` rows of ``block_table``) to the decode ranks the
    plan gives them; ``counts`` are the rows each CP rank holds. Only the moves whose source is
    this rank go; of each row, the heads the destination wants of those it holds. Returns bytes
    sent once they have landed. With NIXL and a landing, rows go as WRITEs straight from this
    rank's blocks into the decode rank's; otherwise over TCP, gathered a bounded slice at a time
    (frames signed under ``frame_key``, the deployment secret, if given). Raises Aborted naming
    the decode rank that failed, InvalidArgument for targets or a layout that do not fit."""
    sent = 0
    local_heads = cache.k.shape[-2]
    held = kv_heads(source.tp_rank, source.tp, source.num_kv_heads)
    if len(held) != local_heads:
        raise InvalidArgument(
            f"prefill rank (CP {source.cp_rank}, TP {source.tp_rank} of {source.tp}) should hold KV heads {held} "
            f"of {source.num_kv_heads}, but its cache has {local_heads}: build it from the TP rank's local config"
        )
    wants = _wants(targets, source.num_kv_heads)
    try:
        plan = plan_layout(counts, source.tp, source.num_kv_heads, wants)
    except ValueError as e:
        raise InvalidArgument(f"request {request_id}: no transfer plan for these decode targets: {e}") from e
    moves = [m for m in plan if m.src_rank == source.cp_rank and m.src_tp == source.tp_rank]
    for i, m in enumerate(moves):
        target = targets[m.dst]
        transfer_id = f"{source.cp_rank}.{i}" if source.tp == 1 else f"{source.cp_rank}.{source.tp_rank}.{i}"
        # Whole rows on both sides: no head ranges, so TP 1 moves exactly as before.
        whole = len(m.src_heads) == local_heads and len(m.dst_heads) == len(wants[m.dst].heads)
        src_heads, dst_heads = (None, None) if whole else (m.src_heads, m.dst_heads)
        try:
            if endpoint is not None and target.nixl_landing:
                sent += endpoint.push(
                    block_table,
                    m.src_start,
                    m.count,
                    target.nixl_landing,
                    m.dst_start,
                    transfer_id,
                    timeout_s,
                    src_heads,
                    dst_heads,
                )
            else:
                slices = _slices(cache, block_table, m, target.first_position, src_heads)
                sent += send_kv(
                    target.address, request_id, target.epoch, transfer_id, slices, timeout_s, frame_key, dst_heads
                )
        except RingserveError as e:
            raise Aborted(f"KV transfer to decode rank at {target.address} failed: {e}") from e
    return sent


def _slices(
    cache: KVCache, block_table: Sequence[int], m: HeadMove, first_position: int, heads: range | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """A move's rows as (first prompt position, kv [layers, 2, n, heads, D]), one bounded slice at a
    time: the whole shard of a long prompt would not fit beside the cache on the device."""
    k, v = cache.k.flatten(1, 2), cache.v.flatten(1, 2)  # [layers, slots, Hkv, D]
    if heads is not None:
        k, v = k[:, :, heads.start : heads.stop], v[:, :, heads.start : heads.stop]
    row_bytes = cache.bytes_per_token * k.shape[2] // cache.k.shape[-2]
    for a, b in row_slices(m.count, row_bytes):
        slots = cache.slots(block_table, m.src_start + a, m.src_start + b)
        yield first_position + m.dst_start + a, torch.stack([k[:, slots], v[:, slots]], dim=1)


class Pusher:
    """One rank's push stage: ``submit`` returns at once; ``report`` gets each request's result."""

    def __init__(
        self,
        runner: CPRunner,
        endpoint: NixlEndpoint | None,
        report: Callable[[PushResult], None],
        timeout_s: float,
        frame_key: bytes | None = None,
        source: SourceRank | None = None,
    ):
        self.runner, self.endpoint, self.report, self.timeout_s = runner, endpoint, report, timeout_s
        self.frame_key = frame_key  # the deployment secret: TCP KV frames carry a MAC under it
        # Where this rank sits in the group's layout (None: TP 1, the runner's rank is its CP rank).
        self.source = source or SourceRank(runner.rank, runner.cache.k.shape[-2])
        self._pool = ThreadPoolExecutor(PUSH_THREADS, thread_name_prefix=f"kv-push-rank{runner.rank}")

    def submit(self, request_id: str, seq: CPSequence, targets: tuple[Target, ...], counts: list[int]) -> None:
        """Push a finished request's shard (its blocks stay held until the leader says otherwise)."""
        self._pool.submit(self._push, request_id, seq, targets, counts)

    def _push(self, request_id: str, seq: CPSequence, targets: tuple[Target, ...], counts: list[int]) -> None:
        result = PushResult(self.runner.rank, request_id)
        t0 = time.perf_counter()
        try:
            if targets:  # none: the KV is not wanted elsewhere (benchmarks of prefill alone)
                result.bytes_sent = push_kv(
                    self.runner.cache,
                    seq.block_table,
                    request_id,
                    targets,
                    counts,
                    self.source,
                    self.endpoint,
                    self.timeout_s,
                    self.frame_key,
                )
        except RingserveError as e:
            log.warning("request_id=%s %s", request_id, e)
            result.error = (e.code, str(e))
        except Exception as e:  # a bug: the request fails, the stage goes on
            log.exception("request_id=%s KV push failed", request_id)
            result.error = ("INTERNAL", f"KV push failed: {type(e).__name__}: {e}")
        result.transfer_s = time.perf_counter() - t0
        self.report(result)

    def notify_done(self, request_id: str, targets: tuple[Target, ...]) -> None:
        """Tell each NIXL target that no WRITE for this request will come any more (after every
        rank's push for it is over), so the decode side frees blocks it holds back at once."""
        if self.endpoint is not None and any(t.nixl_landing for t in targets):
            self._pool.submit(self._notify_done, request_id, targets)

    def _notify_done(self, request_id: str, targets: tuple[Target, ...]) -> None:
        for t in targets:
            if t.nixl_landing:
                try:
                    self.endpoint.notify_done(t.nixl_landing)
                except RingserveError as e:  # the decode side frees them at its quarantine timeout
                    log.warning("request_id=%s decode rank at %s: %s", request_id, t.address, e)

    def close(self) -> None:
        """Wait for pushes in flight (each ends within its timeout)."""
        self._pool.shutdown(wait=True)
