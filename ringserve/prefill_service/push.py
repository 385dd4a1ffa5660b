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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ringserve.errors import Aborted, RingserveError
from ringserve.kv_transfer.nixl import NixlEndpoint
from ringserve.kv_transfer.plan import Move, plan_moves
from ringserve.kv_transfer.tcp import row_slices, send_kv
from ringserve.prefill_service.context_parallel import CPRunner, CPSequence

log = logging.getLogger(__name__)

PUSH_THREADS = 4  # pushes to different decode ranks in flight at once on one prefill rank


@dataclass(frozen=True)
class Target:
    """A decode rank's share of a request's prompt KV."""

    address: str
    first_position: int
    num_tokens: int
    nixl_landing: bytes = b""  # empty: the decode rank takes this share over TCP only
    epoch: int = 0  # the decode reservation's epoch (TCP frames carry it)


@dataclass
class PushResult:
    """What one rank reports for one finished request: bytes pushed, or the error that stopped it."""

    rank: int
    request_id: str
    bytes_sent: int = 0
    transfer_s: float = 0.0
    error: tuple[str, str] | None = None  # (status code name, message)


def push_kv(
    runner: CPRunner,
    seq: CPSequence,
    request_id: str,
    targets: tuple[Target, ...],
    counts: list[int],
    endpoint: NixlEndpoint | None,
    timeout_s: float,
    frame_key: bytes | None = None,
) -> int:
    """Send this rank's KV rows to the decode ranks the plan gives them; returns bytes sent once
    they have landed. With NIXL and a landing, rows go as WRITEs straight from this rank's blocks
    into the decode rank's; otherwise over TCP, gathered a bounded slice at a time (frames signed
    under ``frame_key``, the deployment secret, if given). Raises Aborted naming the decode rank
    that failed."""
    sent = 0
    moves = [m for m in plan_moves(counts, [t.num_tokens for t in targets]) if m.src_rank == runner.rank]
    for i, m in enumerate(moves):
        target, transfer_id = targets[m.dst_rank], f"{runner.rank}.{i}"
        try:
            if endpoint is not None and target.nixl_landing:
                sent += endpoint.push(
                    seq.block_table, m.src_start, m.count, target.nixl_landing, m.dst_start, transfer_id, timeout_s
                )
            else:
                slices = _slices(runner, seq, m, target.first_position)
                sent += send_kv(target.address, request_id, target.epoch, transfer_id, slices, timeout_s, frame_key)
        except RingserveError as e:
            raise Aborted(f"KV transfer to decode rank at {target.address} failed: {e}") from e
    return sent


def _slices(runner: CPRunner, seq: CPSequence, m: Move, first_position: int) -> Iterator[tuple[int, torch.Tensor]]:
    """A move's rows as (first prompt position, kv [layers, 2, n, Hkv, D]), one bounded slice at a
    time: the whole shard of a long prompt would not fit beside the cache on the device."""
    cache = runner.cache
    k, v = cache.k.flatten(1, 2), cache.v.flatten(1, 2)  # [layers, slots, Hkv, D]
    for a, b in row_slices(m.count, cache.bytes_per_token):
        slots = cache.slots(seq.block_table, m.src_start + a, m.src_start + b)
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
    ):
        self.runner, self.endpoint, self.report, self.timeout_s = runner, endpoint, report, timeout_s
        self.frame_key = frame_key  # the deployment secret: TCP KV frames carry a MAC under it
        self._pool = ThreadPoolExecutor(PUSH_THREADS, thread_name_prefix=f"kv-push-rank{runner.rank}")

    def submit(self, request_id: str, seq: CPSequence, targets: tuple[Target, ...], counts: list[int]) -> None:
        """Push a finished request's shard (its blocks stay held until the leader says otherwise)."""
        self._pool.submit(self._push, request_id, seq, targets, counts)

    def _push(self, request_id: str, seq: CPSequence, targets: tuple[Target, ...], counts: list[int]) -> None:
        result = PushResult(self.runner.rank, request_id)
        t0 = time.perf_counter()
        try:
            if targets:  # none: the KV is not wanted elsewhere (benchmarks of prefill alone)
                endpoint, timeout = self.endpoint, self.timeout_s
                result.bytes_sent = push_kv(
                    self.runner, seq, request_id, targets, counts, endpoint, timeout, self.frame_key
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
