"""The decode worker: the scheduler of a KVP decode group (it runs in the leader, rank 0).

A request goes through three states here:

1. reserved: ``reserve`` picks the ranks that will hold its KV (one for short requests, more as
   the context grows), takes blocks on each for its share of the prompt and of its whole
   generation (so it can never run out mid-stream), and says where the prompt's KV goes;
2. landing: each rank's KV receiver writes its share into those blocks and reports it;
3. active: ``start`` adds it to the running batch; every step decodes one token for each active
   request in one forward over the group, and new requests join between steps.

Whatever ends a request (finish, cancel, release, an error, a reservation never claimed) frees
its blocks, in one place: ``_finish``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ringserve.decode_service.group import DecodeGroup
from ringserve.decode_service.kvp import StepEntry
from ringserve.engine.engine import TokenEvent
from ringserve.engine.kv_cache import BlockAllocator, blocks_needed
from ringserve.engine.output import TextOutput
from ringserve.engine.sampling import SamplingParams, sample
from ringserve.engine.tokenizer import Tokenizer
from ringserve.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RingserveError,
    Unavailable,
)
from ringserve.kv_transfer.plan import balanced_shares
from ringserve.metrics import KV_BLOCKS, QUEUE_DEPTH

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One request's state on this worker."""

    request_id: str
    tables: dict[int, list[int]]  # rank -> its blocks for this request
    rows: dict[int, int]  # rank -> KV rows it holds (prompt share, then generated tokens)
    prompt_len: int
    max_tokens: int  # generation budget, already capped by the model's context
    reserved_at: float
    landed: int = 0  # prompt tokens whose KV has arrived, over all ranks
    # Set by start():
    token_ids: list[int] = field(default_factory=list)
    generated: int = 0
    params: SamplingParams | None = None
    output: TextOutput | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False


class DecodeWorker:
    """Schedules a decode group's requests: placement, admission, batching, sampling; thread-safe."""

    def __init__(
        self,
        group: DecodeGroup,
        tokenizer: Tokenizer,
        reservation_ttl_s: float = 120.0,
        max_batch: int = 64,
        shard_tokens: int = 32768,
        landing_timeout_s: float = 10.0,
    ):
        self.group, self.tokenizer = group, tokenizer
        self.model = group.model
        self.device = group.rank0.device
        self.block_size = group.rank0.cache.block_size
        # The leader allocates every rank's blocks; rank 0's allocator is its cache's own.
        self.allocators = [group.rank0.cache.allocator] + [
            BlockAllocator(group.rank0.cache.allocator.num_blocks) for _ in range(1, group.world)
        ]
        self.max_context = self.model.config.max_position_embeddings
        self.reservation_ttl_s = reservation_ttl_s
        self.max_batch = max_batch
        self.shard_tokens = shard_tokens
        self.landing_timeout_s = landing_timeout_s
        self.requests: dict[str, Request] = {}
        self.active: list[Request] = []
        self.failure: str | None = None  # set when a rank dies: the group serves nothing more
        self.on_failure: Callable[[], None] | None = None  # e.g. fail the liveness probe: restart us
        self.lock = threading.Condition()
        self._stop = False
        group.start_monitor(self._landed, self._group_failed)
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self._thread.start()
        self._update_gauges()

    @property
    def blocks_used(self) -> int:
        return sum(a.num_used for a in self.allocators)

    @property
    def blocks_free(self) -> int:
        return sum(a.num_free for a in self.allocators)

    # --- reservations and KV landing --------------------------------------------------------

    def degree(self, rows: int) -> int:
        """Ranks a request of ``rows`` KV rows spreads over: one per ``shard_tokens``, at most K."""
        return max(1, min(self.group.world, -(-rows // self.shard_tokens)))

    def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int) -> list[tuple[int, str, int, int, bytes]]:
        """Take blocks for the prompt and its generation on the ranks that will hold the request;
        returns [(rank, KV receiver address, first prompt position, prompt tokens, NIXL landing)]
        per rank (the landing is empty when the group receives by TCP only)."""
        if prompt_tokens < 1:
            raise InvalidArgument("prompt_tokens must be at least 1")
        if prompt_tokens >= self.max_context:
            raise InvalidArgument(
                f"the prompt has {prompt_tokens} tokens but the model's context is {self.max_context}"
            )
        if max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1")
        budget = min(max_tokens, self.max_context - prompt_tokens)
        request_id = request_id or uuid.uuid4().hex
        # The last generated token is never fed back, so prompt + budget - 1 rows suffice.
        rows = prompt_tokens + budget - 1
        with self.lock:
            if self.failure:
                raise Unavailable(f"this decode group is broken ({self.failure}); restart it")
            if request_id in self.requests:
                raise InvalidArgument(f"request {request_id} is already reserved on this decode worker")
            d = self.degree(rows)
            # The d ranks with the most free blocks, in rank order (shares are laid out in it).
            ranks = sorted(sorted(range(self.group.world), key=lambda r: -self.allocators[r].num_free)[:d])
            needs = [blocks_needed(n, self.block_size) for n in balanced_shares(rows, d)]
            short = [(r, n) for r, n in zip(ranks, needs) if n > self.allocators[r].num_free]
            if short:  # check every rank before taking anything: never half-admitted
                r, n = short[0]
                raise ResourceExhausted(
                    f"KV cache full: request {request_id} needs {n} blocks on decode rank {r}, "
                    f"{self.allocators[r].num_free} free; retry later or shorten the request"
                )
            tables = {r: self.allocators[r].allocate(n) for r, n in zip(ranks, needs)}
            shares = balanced_shares(prompt_tokens, d)
            starts = [sum(shares[:i]) for i in range(d)]
            req = Request(request_id, tables, dict(zip(ranks, shares)), prompt_tokens, budget, time.monotonic())
            self.requests[request_id] = req
            for r, start, share in zip(ranks, starts, shares):
                msg = (request_id, tables[r], start, share)
                if r == 0:
                    req.landed += self.group.rank0.reserve(*msg)
                else:
                    self.group.send(r, ("reserve", *msg))
            self._update_gauges()
        return [
            (r, self.group.addresses[r], start, share, self._landing(r, request_id, tables[r], share))
            for r, start, share in zip(ranks, starts, shares)
        ]

    def _landing(self, rank: int, request_id: str, table: list[int], share: int) -> bytes:
        template = self.group.templates[rank]
        if template is None:
            return b""
        from ringserve.kv_transfer.nixl import landing_bytes

        return landing_bytes(template, request_id, table, share)

    def _landed(self, request_id: str, rows: int) -> None:
        """A rank stored ``rows`` prompt rows of a request (called by the KV receivers' sinks)."""
        with self.lock:
            req = self.requests.get(request_id)
            if req is not None:
                req.landed += rows
                self.lock.notify_all()

    # --- decoding ---------------------------------------------------------------------------

    def start(self, request_id: str, prompt_ids: list[int], first_token: int, params: SamplingParams) -> Request:
        """Begin decoding a reserved request whose KV has landed; read events from ``request.events``."""
        params.validate_for(self.model.config.vocab_size)
        with self.lock:
            req = self.requests.get(request_id)
            if req is None:
                raise NotFound(f"no reservation for request {request_id} (expired or released?)")
            if req.params is not None:
                raise FailedPrecondition(f"request {request_id} is already decoding")
            if len(prompt_ids) != req.prompt_len:
                raise InvalidArgument(f"{len(prompt_ids)} prompt tokens given, {req.prompt_len} reserved")
            # The last rank's "landed" message may trail the prefill tier's answer by a moment.
            deadline = time.monotonic() + self.landing_timeout_s
            while req.landed < req.prompt_len and self.lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                pass
            if self.requests.get(request_id) is not req:
                raise NotFound(f"request {request_id} ended while its KV was landing")
            if req.landed != req.prompt_len:
                raise FailedPrecondition(
                    f"only {req.landed} of {req.prompt_len} prompt tokens' KV arrived for request {request_id}"
                )
            req.params = params
            req.max_tokens = min(req.max_tokens, params.max_tokens)
            req.output = TextOutput(self.tokenizer, params)
            req.token_ids = list(prompt_ids)
            if not self._emit(req, first_token):
                self.active.append(req)
                self.lock.notify_all()
            self._update_gauges()
        return req

    def cancel(self, request_id: str) -> bool:
        """End a request however far it got; its blocks are freed (by the loop if it is running)."""
        with self.lock:
            req = self.requests.get(request_id)
            if req is None:
                return False
            req.cancelled = True
            if req not in self.active:  # not in a forward: free now
                self._finish(req, Cancelled(f"request {request_id} was cancelled"))
            self.lock.notify_all()
            return True

    def _emit(self, req: Request, token: int) -> bool:
        """Record a sampled token and queue its event; returns True if the request is done."""
        text, stopped = req.output.push(token)
        req.token_ids.append(token)
        req.generated += 1
        done = stopped or req.generated >= req.max_tokens or len(req.token_ids) >= self.max_context
        if done and not stopped:
            text += req.output.finish()
        req.events.put(TokenEvent(token, text, ("stop" if stopped else "length") if done else None))
        if done:
            self._finish(req, None)
        return done

    def _finish(self, req: Request, error: RingserveError | None) -> None:
        """Free everything the request holds (caller holds the lock); idempotent."""
        if self.requests.pop(req.request_id, None) is None:
            return
        if req in self.active:
            self.active.remove(req)
        for r, table in req.tables.items():
            self.allocators[r].free(table)
            self.group.rank0.free(req.request_id) if r == 0 else self.group.send(r, ("free", req.request_id))
        req.tables = {}
        if error is not None:
            req.events.put(error)
        self._update_gauges()

    def _loop(self) -> None:
        while True:
            with self.lock:
                self._drop_cancelled_and_expired()
                while not self.active and not self._stop:
                    self.lock.wait(timeout=1.0)
                    self._drop_cancelled_and_expired()
                if self._stop:
                    return
                batch = self.active[: self.max_batch]
            try:
                logits = self._forward(batch)
            except Exception as e:
                if self.group.world > 1:  # the ranks may be out of step now: the group is done
                    log.exception("decode step failed")
                    self._group_failed(f"a decode step failed: {type(e).__name__}: {e}")
                    continue
                # One rank: fail the batch, keep the worker alive.
                log.exception("decode step failed")
                with self.lock:
                    for req in batch:
                        self._finish(req, RingserveError(f"decode step failed: {type(e).__name__}: {e}"))
                continue
            with self.lock:
                for i, req in enumerate(batch):
                    if req.request_id not in self.requests:  # ended during the step (group failure)
                        continue
                    if req.cancelled:
                        self._finish(req, Cancelled(f"request {req.request_id} was cancelled"))
                        continue
                    self._emit(req, sample(logits[i], req.params, req.params.generator(req.generated)))
                # Rotate so that more requests than max_batch take turns.
                stepped = {id(r) for r in batch}
                self.active = [r for r in self.active if id(r) not in stepped] + [
                    r for r in self.active if id(r) in stepped
                ]

    def _forward(self, batch: list[Request]) -> torch.Tensor:
        """One decode step over the group. Each token's K and V go to the request's rank with the
        fewest rows (ties: the lowest), which keeps shards balanced as generation goes on."""
        entries = []
        for r in batch:
            owner = min(r.rows, key=lambda rank: (r.rows[rank], rank))
            r.rows[owner] += 1
            entries.append(StepEntry(r.request_id, r.token_ids[-1], len(r.token_ids) - 1, owner))
        # A step whose requests all live on rank 0 alone needs no other rank and no communication.
        group_wide = any(set(r.rows) != {0} for r in batch)
        if group_wide:
            for rank in range(1, self.group.world):
                self.group.send(rank, ("step", entries))
        return self.group.rank0.step(entries, group_wide)

    def _group_failed(self, what: str) -> None:
        """A rank died or failed: end every request with UNAVAILABLE and refuse new ones."""
        log.error("decode group failed: %s; every request on it ends", what)
        with self.lock:
            self.failure = self.failure or what
            for req in list(self.requests.values()):
                self._finish(req, Unavailable(f"decode group failed: {what}"))
            self.lock.notify_all()
        if self.on_failure is not None:
            self.on_failure()

    def _drop_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        for req in list(self.requests.values()):
            if req.cancelled and req not in self.active:
                self._finish(req, Cancelled(f"request {req.request_id} was cancelled"))
            elif req.params is None and now - req.reserved_at > self.reservation_ttl_s:
                log.warning(
                    "request_id=%s reservation expired unclaimed after %.0f s",
                    req.request_id,
                    self.reservation_ttl_s,
                )
                self._finish(req, DeadlineExceeded("reservation expired"))

    def _update_gauges(self) -> None:
        KV_BLOCKS.labels("decode", "used").set(self.blocks_used)
        KV_BLOCKS.labels("decode", "free").set(self.blocks_free)
        QUEUE_DEPTH.labels("decode").set(len(self.requests))

    def close(self) -> None:
        with self.lock:
            self._stop = True
            for req in list(self.requests.values()):
                self._finish(req, Cancelled("the decode worker is shutting down"))
            self.lock.notify_all()
        self._thread.join(timeout=10)
        self.group.close()
