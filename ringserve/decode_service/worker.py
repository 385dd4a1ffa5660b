"""The decode worker: the scheduler of a KVP decode group (it runs in the leader, rank 0).

A request goes through three states here:

1. reserved: ``reserve`` picks the ranks that will hold its KV (one for short requests, more as
   the context grows), takes blocks on each for its share of the prompt plus a bounded headroom
   (one block's worth per rank: a generation budget never pins blocks it has not used), and says
   where the prompt's KV goes;
2. landing: each rank's KV receiver writes its share into those blocks and reports it;
3. active: ``start`` adds it to the running batch; every step decodes one token for each active
   request in one forward over the group, and new requests join between steps. A request's blocks
   grow as it generates (the rank that stores the new token takes a block when its last is full);
   a request with no free slot on any of its ranks sits out steps until blocks free up, and when
   every running request is stuck the youngest ends with RESOURCE_EXHAUSTED (no deadlock).
   Admission keeps one free block per request on a rank for that growth (the watermark).

Each step samples the whole batch in one call and copies the tokens to the host once; text,
stop strings and stream events are the output stage's (decode_service/stream.py), off the step.
A request whose logits cannot be sampled (NaN) ends alone with an error; if the loop itself fails,
every request ends with UNAVAILABLE and the group is marked failed (``on_failure``: liveness).

Whatever ends a request (finish, cancel, release, an error, a lease not renewed) frees its
blocks, in one place: ``_finish``; except that blocks a NIXL WRITE may still reach go to
quarantine first, until every row of the reservation has landed, the prefill side says it is
done with it, or ``--quarantine-timeout-s`` passes. Each reservation has an epoch, unique for
the worker's life: a landing counts only for its reservation's epoch, and each row only once.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ringserve.decode_service.group import DecodeGroup
from ringserve.decode_service.kvp import StepEntry
from ringserve.decode_service.landed_rows import LandedRows
from ringserve.decode_service.stream import OutputStage
from ringserve.engine.kv_cache import BlockAllocator, blocks_needed
from ringserve.engine.output import TextOutput
from ringserve.engine.sampling import SamplingParams, sample_batch
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
from ringserve.kv_transfer.secret import deployment_secret
from ringserve.metrics import KV_BLOCKS, KV_DROPPED, QUEUE_DEPTH

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
    landed: int = 0  # prompt tokens whose KV has arrived, over all ranks (each row once, this epoch only)
    epoch: int = 0  # this reservation's number, unique for the worker's life
    shares: dict[int, int] = field(default_factory=dict)  # rank -> prompt rows it takes
    lease_until: float = 0.0  # an unclaimed reservation expires then, unless renewed
    nixl: bool = False  # a NIXL landing was handed out: a one-sided WRITE may reach its blocks
    prefill_done: bool = False  # the prefill side said it writes nothing more for this epoch
    landed_rows: dict[int, LandedRows] = field(default_factory=dict)  # rank -> its rows that landed
    quarantined_at: float | None = None  # ended, blocks held until no WRITE can land
    # Set by start():
    last_token: int = 0  # the newest token: the next step's input
    generated: int = 0
    started_at: float = 0.0
    params: SamplingParams | None = None
    output: TextOutput | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    stopped: bool = False  # the output stage saw a stop token or string: end it before its next step
    closed: bool = False  # the stream's last event is out (the output stage's)


@dataclass(frozen=True)
class Reservation:
    """What ``reserve`` answers: the epoch, the lease, and per rank (rank, KV receiver address,
    first prompt position, prompt tokens, NIXL landing or b"")."""

    epoch: int
    lease_s: float
    targets: list[tuple[int, str, int, int, bytes]]


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
        self.landing_key = deployment_secret(group.cfg.deployment_secret_file)  # signs NIXL landings
        self.requests: dict[str, Request] = {}
        self.quarantine: dict[int, Request] = {}  # epoch -> an ended reservation whose blocks are held back
        self.quarantine_timeout_s = group.cfg.quarantine_timeout_s
        self.dropped: Counter[str] = Counter()  # landings and notices that counted nothing, by reason
        self._epochs = itertools.count(1)
        self.active: list[Request] = []
        self.failure: str | None = None  # set when a rank dies: the group serves nothing more
        self.on_failure: Callable[[], None] | None = None  # e.g. fail the liveness probe: restart us
        self.lock = threading.Condition()
        self._stop = False
        self.output = OutputStage()
        group.start_monitor(self._landed, self._prefill_done, self._group_failed)
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self._thread.start()
        self._update_gauges()

    @property
    def blocks_used(self) -> int:
        return sum(a.num_used for a in self.allocators)

    @property
    def blocks_free(self) -> int:
        return sum(a.num_free for a in self.allocators)

    @property
    def blocks_total(self) -> int:
        return sum(a.num_blocks for a in self.allocators)

    @property
    def serving(self) -> bool:
        """False once the group failed or the loop or output thread is gone (streams must end)."""
        return self.failure is None and self._thread.is_alive() and self.output.alive

    def admissible_blocks(self) -> int:
        """The largest reservation, in blocks over all its ranks, that ``reserve`` could admit now
        (what the registry and GetInfo report as free): a request on d ranks takes the same share
        on each of the d ranks with the most free blocks, less each rank's growth watermark, so it
        can have d x the d-th largest of those (caller holds the lock)."""
        free = sorted((a.num_free - self._growth_watermark(r) for r, a in enumerate(self.allocators)), reverse=True)
        return max(0, max(d * f for d, f in enumerate(free, start=1)))

    def _growth_watermark(self, rank: int) -> int:
        """Blocks admission leaves free on a rank: one per request there, for its next block."""
        return sum(rank in req.tables for req in self.requests.values())

    @property
    def quarantined_blocks(self) -> int:
        """Blocks of ended reservations held back because a NIXL WRITE may still land in them."""
        with self.lock:
            return sum(len(t) for req in self.quarantine.values() for t in req.tables.values())

    # --- reservations and KV landing --------------------------------------------------------

    def degree(self, rows: int) -> int:
        """Ranks a request of ``rows`` KV rows spreads over: one per ``shard_tokens``, at most K."""
        return max(1, min(self.group.world, -(-rows // self.shard_tokens)))

    def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int) -> Reservation:
        """Take blocks for the prompt and its generation on the ranks that will hold the request;
        answers its epoch, its lease (renew it with ``renew`` until ``start``) and where each
        rank's share of the prompt goes (the landing is empty when the group receives by TCP only)."""
        if prompt_tokens < 1:
            raise InvalidArgument("prompt_tokens must be at least 1")
        if prompt_tokens >= self.max_context:
            raise InvalidArgument(
                f"the prompt has {prompt_tokens} tokens but the model's context is {self.max_context}"
            )
        if max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1")
        if max_tokens > self.max_context:
            raise InvalidArgument(f"max_tokens is {max_tokens} but the model's context is {self.max_context} tokens")
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
            held = prompt_tokens + min(budget - 1, d * self.block_size)  # the rest grows on demand
            needs = [blocks_needed(n, self.block_size) for n in balanced_shares(held, d)]
            kept = {r: self._growth_watermark(r) for r in ranks}
            short = [(r, n) for r, n in zip(ranks, needs) if n + kept[r] > self.allocators[r].num_free]
            if short:  # check every rank before taking anything: never half-admitted
                r, n = short[0]
                raise ResourceExhausted(
                    f"KV cache full: request {request_id} needs {n} blocks on decode rank {r}, "
                    f"{self.allocators[r].num_free} free of which {kept[r]} are kept for running requests' "
                    "growth; retry later or shorten the request"
                )
            tables = {r: self.allocators[r].allocate(n) for r, n in zip(ranks, needs)}
            shares = balanced_shares(prompt_tokens, d)
            starts = [sum(shares[:i]) for i in range(d)]
            now = time.monotonic()
            req = Request(request_id, tables, dict(zip(ranks, shares)), prompt_tokens, budget, now)
            req.epoch, req.shares = next(self._epochs), dict(zip(ranks, shares))
            req.lease_until = now + self.reservation_ttl_s
            self.requests[request_id] = req
            for r, start, share in zip(ranks, starts, shares):
                msg = (request_id, req.epoch, tables[r], start, share)
                if r == 0:
                    self.group.rank0.reserve(*msg)
                else:
                    self.group.send(r, ("reserve", *msg))
            targets = [
                (r, self.group.addresses[r], start, share, self._landing(r, req, share))
                for r, start, share in zip(ranks, starts, shares)
            ]
            req.nixl = any(landing for *_, landing in targets)
            self._update_gauges()
        return Reservation(req.epoch, self.reservation_ttl_s, targets)

    def _landing(self, rank: int, req: Request, share: int) -> bytes:
        template = self.group.templates[rank]
        if template is None:
            return b""
        from ringserve.kv_transfer.landing import landing_bytes

        expires = time.time() + self.reservation_ttl_s  # the prefill side admits it once, before this
        return landing_bytes(template, req.request_id, req.epoch, req.tables[rank], share, self.landing_key, expires)

    def renew(self, request_id: str, epoch: int) -> bool:
        """Extend the lease of reservation ``epoch`` (the router does, every lease/3, while the
        prefill tier works); False if it has ended (expired, released) or is another epoch."""
        with self.lock:
            req = self.requests.get(request_id)
            if req is None or req.epoch != epoch:
                return False
            req.lease_until = max(req.lease_until, time.monotonic() + self.reservation_ttl_s)
            return True

    def _landed(
        self, rank: int, request_id: str, epoch: int, transfer_id: str, first: int, count: int, heads=None
    ) -> None:
        """Rows [first, first + count) of ``rank``'s share of reservation ``epoch`` landed (from the
        ranks' KV receivers), of the rank's local KV ``heads`` (None: whole rows). A row counts once
        all its heads landed, and only for that epoch: a repeated push, or a notification for an
        ended reservation, adds nothing."""
        where = f"request_id={request_id} epoch={epoch} transfer={transfer_id} rank={rank}"
        with self.lock:
            req = self.requests.get(request_id)
            if req is None or req.epoch != epoch:
                req = self.quarantine.get(epoch)
            if req is None or req.request_id != request_id:
                self._count_dropped("stale")
                log.warning("%s: %d KV rows landed for no live reservation; ignored", where, count)
                return
            rows = req.landed_rows.setdefault(rank, LandedRows(self.group.rank0.cache.k.shape[-2]))
            if first < 0 or first + count > req.shares.get(rank, 0) or not rows.holds(heads):
                self._count_dropped("outside_share")
                log.warning("%s: KV rows [%d, %d) are outside the rank's share; ignored", where, first, first + count)
                return
            added = rows.add(first, first + count, heads)
            if added.repeated:
                self._count_dropped("repeated")
                log.info(
                    "%s: %d of %d KV cells had landed already (a repeated push)",
                    where,
                    added.cells - added.new_cells,
                    added.cells,
                )
            req.landed += added.completed
            if req.quarantined_at is None:  # rows arriving: the prefill side is at work, keep the lease
                req.lease_until = max(req.lease_until, time.monotonic() + self.reservation_ttl_s)
            elif req.landed >= req.prompt_len:
                self._unquarantine(req, "every row has landed")
            self.lock.notify_all()

    def _prefill_done(self, request_id: str, epoch: int) -> None:
        """The prefill side WRITEs nothing more for reservation ``epoch`` (its NIXL "done")."""
        with self.lock:
            req = self.quarantine.get(epoch)
            if req is not None and req.request_id == request_id:
                self._unquarantine(req, "the prefill side is done with it")
                return
            req = self.requests.get(request_id)
            if req is not None and req.epoch == epoch:
                req.prefill_done = True
            else:
                self._count_dropped("stale")
                log.info("request_id=%s epoch=%d: a done notice for no live reservation", request_id, epoch)

    def _count_dropped(self, reason: str) -> None:
        self.dropped[reason] += 1
        KV_DROPPED.labels(reason).inc()

    def _ending(self) -> bool:
        """The group is broken or stopping: nothing will reuse its blocks, quarantine is moot."""
        return self.failure is not None or self._stop

    def _release_quarantine_if_ending(self) -> None:
        if self._ending():
            for held in list(self.quarantine.values()):
                self._unquarantine(held, "the decode worker is stopping" if self._stop else "the group failed")

    def _unquarantine(self, req: Request, why: str) -> None:
        """Free a quarantined reservation's blocks (caller holds the lock)."""
        del self.quarantine[req.epoch]
        blocks = sum(len(t) for t in req.tables.values())
        for r, table in req.tables.items():
            self.allocators[r].free(table)
        req.tables = {}
        log.info("request_id=%s epoch=%d: %d quarantined blocks freed: %s", req.request_id, req.epoch, blocks, why)
        self._update_gauges()

    # --- decoding ---------------------------------------------------------------------------

    def start(self, request_id: str, prompt_tokens: int, first_token: int, params: SamplingParams) -> Request:
        """Begin decoding a reserved request whose KV has landed; read events from ``request.events``.
        ``prompt_tokens`` must be what was reserved; the prefill tier sampled ``first_token``. If the
        request cannot start, its reservation ends here (the router has handed it to us)."""
        with self.lock:
            req = self.requests.get(request_id)
            if req is None:
                raise NotFound(f"no reservation for request {request_id} (expired or released?)")
            if req.params is not None:
                raise FailedPrecondition(f"request {request_id} is already decoding")
            try:
                self._check_start(req, prompt_tokens, first_token, params)
            except RingserveError as e:
                self._finish(req, e)
                raise
            req.params, req.started_at = params, time.monotonic()
            req.max_tokens = min(req.max_tokens, params.max_tokens)
            req.output = TextOutput(self.tokenizer, params)
            if not self._emit(req, first_token):
                self.active.append(req)
                self.lock.notify_all()
            self._update_gauges()
        return req

    def fail_reserved(self, request_id: str, error: RingserveError) -> None:
        """End a reservation whose Decode call failed before it could start (no-op once decoding)."""
        with self.lock:
            req = self.requests.get(request_id)
            if req is not None and req.params is None:
                self._finish(req, error)

    def _check_start(self, req: Request, prompt_tokens: int, first_token: int, params: SamplingParams) -> None:
        """Everything start() needs, waiting for the prompt's KV (caller holds the lock)."""
        if self.failure:
            raise Unavailable(f"this decode group is broken ({self.failure}); restart it")
        params.validate_for(self.model.config.vocab_size, self.max_context)
        if prompt_tokens != req.prompt_len:
            raise InvalidArgument(f"{prompt_tokens} prompt tokens given, {req.prompt_len} reserved")
        if not 0 <= first_token < self.model.config.vocab_size:
            raise InvalidArgument(f"first_token {first_token} is outside the vocabulary")
        # The last rank's "landed" message may trail the prefill tier's answer by a moment.
        deadline = time.monotonic() + self.landing_timeout_s
        while req.landed < req.prompt_len and self.lock.wait(timeout=max(0.0, deadline - time.monotonic())):
            pass
        if self.requests.get(req.request_id) is not req:
            raise NotFound(f"request {req.request_id} ended while its KV was landing")
        if req.landed != req.prompt_len:
            raise FailedPrecondition(
                f"only {req.landed} of {req.prompt_len} prompt tokens' KV arrived for request {req.request_id}"
            )

    def cancel(self, request_id: str, landing_unused: bool = False) -> bool:
        """End a request however far it got; its blocks are freed (by the loop if it is running).
        ``landing_unused``: the router says no prefill group ever got its landings, so no WRITE
        can come and its blocks need no quarantine."""
        with self.lock:
            req = self.requests.get(request_id)
            if req is None:
                return False
            req.cancelled = True
            req.prefill_done = req.prefill_done or landing_unused
            if req not in self.active:  # not in a forward: free now
                self._finish(req, Cancelled(f"request {request_id} was cancelled"))
            self.lock.notify_all()
            return True

    def _emit(self, req: Request, token: int) -> bool:
        """Record a sampled token and hand it to the output stage; True if the request is done (at
        its budget or the context: stop tokens and strings are the output stage's to find)."""
        req.last_token = token
        req.generated += 1
        done = req.generated >= req.max_tokens or req.prompt_len + req.generated >= self.max_context
        self.output.token(req, token, "length" if done else None)
        if done:
            self._finish(req, None)
        return done

    def _finish(self, req: Request, error: RingserveError | None) -> None:
        """Free everything the request holds (caller holds the lock); idempotent. Blocks a NIXL
        WRITE may still reach (a landing handed out, rows missing, the prefill side not done) go
        to quarantine instead, unless the group is broken or stopping (nothing reuses them then)."""
        if self.requests.pop(req.request_id, None) is None:
            return
        if req in self.active:
            self.active.remove(req)
        for r in req.tables:
            msg = (req.request_id, req.epoch)
            self.group.rank0.free(*msg) if r == 0 else self.group.send(r, ("free", *msg))
        if req.nixl and req.landed < req.prompt_len and not req.prefill_done and not self._ending():
            req.quarantined_at = time.monotonic()
            self.quarantine[req.epoch] = req
            log.info(
                "request_id=%s epoch=%d ended with %d of %d prompt rows landed: its blocks wait in quarantine",
                req.request_id,
                req.epoch,
                req.landed,
                req.prompt_len,
            )
        else:
            for r, table in req.tables.items():
                self.allocators[r].free(table)
            req.tables = {}
        self._release_quarantine_if_ending()
        if error is not None:
            self.output.error(req, error)  # after the tokens already queued for the stream
        self._update_gauges()

    def _loop(self) -> None:
        try:
            while self._step():
                pass
        except Exception as e:  # the loop cannot go on: nothing would ever end the streams otherwise
            log.exception("decode loop failed")
            self._group_failed(f"the decode loop failed: {type(e).__name__}: {e}")

    def _step(self) -> bool:
        """Plan, run and sample one step; False when the worker stops."""
        with self.lock:
            self._drop_cancelled_and_expired()
            while not self.active and not self._stop:
                self.lock.wait(timeout=1.0)
                self._drop_cancelled_and_expired()
            if self._stop or self.failure:
                return False
            batch, entries = self._plan()
        if not batch:
            return True
        try:
            logits = self._forward(batch, entries)
        except Exception as e:
            log.exception("decode step failed")
            if self.group.world > 1:  # the ranks may be out of step now: the group is done
                self._group_failed(f"a decode step failed: {type(e).__name__}: {e}")
                return True
            with self.lock:  # one rank: fail the batch, keep the worker alive
                for req in batch:
                    self._finish(req, RingserveError(f"decode step failed: {type(e).__name__}: {e}"))
            return True
        generators = [r.params.generator(r.generated) for r in batch]
        sampled = sample_batch(logits, [r.params for r in batch], generators).tolist()  # one copy to the host
        with self.lock:
            for req, (token, ok) in zip(batch, sampled):
                if self.requests.get(req.request_id) is not req:  # ended during the step (group failure)
                    continue
                if req.cancelled:
                    self._finish(req, Cancelled(f"request {req.request_id} was cancelled"))
                elif not ok:
                    why = "the model's logits are not finite (NaN or inf); it cannot go on"
                    self._finish(req, RingserveError(f"request {req.request_id}: {why}"))
                else:
                    self._emit(req, token)
            # Rotate so that more requests than max_batch (and paused ones) take turns.
            stepped = {id(r) for r in batch}
            self.active = [r for r in self.active if id(r) not in stepped] + [
                r for r in self.active if id(r) in stepped
            ]
        return True

    def _plan(self) -> tuple[list[Request], list[StepEntry]]:
        """The next step's requests and their entries (caller holds the lock): ends stopped and
        cancelled requests, picks each request's owner rank for its new token, growing its blocks
        there; skips requests with no free slot; ends the youngest when none can step."""
        for req in list(self.active):
            if req.cancelled:
                self._finish(req, Cancelled(f"request {req.request_id} was cancelled"))
            elif req.stopped:
                self._finish(req, None)
        batch, entries = [], []
        for req in self.active:
            if len(batch) == self.max_batch:
                break
            owner = self._owner(req)
            if owner is None:
                continue  # paused until blocks free up
            req.rows[owner] += 1
            batch.append(req)
            entries.append(StepEntry(req.request_id, req.last_token, req.prompt_len + req.generated - 1, owner))
        if self.active and not batch:
            youngest = max(self.active, key=lambda r: r.started_at)
            log.warning("request_id=%s ended: every running request is out of KV blocks", youngest.request_id)
            self._finish(youngest, ResourceExhausted("decode KV cache full; retry"))
        return batch, entries

    def _owner(self, req: Request) -> int | None:
        """The rank that stores a request's next token: the one with the fewest of its rows (ties:
        the lowest), keeping shards balanced, that has a free slot or can take a block for one."""
        for rank in sorted(req.rows, key=lambda r: (req.rows[r], r)):
            if req.rows[rank] < len(req.tables[rank]) * self.block_size:
                return rank
            if self.allocators[rank].num_free:
                block = self.allocators[rank].allocate(1)
                req.tables[rank] = req.tables[rank] + block  # a new list: rank 0's shard keeps its own
                if rank == 0:
                    self.group.rank0.extend(req.request_id, block)
                else:
                    self.group.send(rank, ("extend", req.request_id, block))
                self._update_gauges()
                return rank
        return None

    def _forward(self, batch: list[Request], entries: list[StepEntry]) -> torch.Tensor:
        """One decode step over the group."""
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
        self._release_quarantine_if_ending()
        for req in list(self.requests.values()):
            if req.cancelled and req not in self.active:
                self._finish(req, Cancelled(f"request {req.request_id} was cancelled"))
            elif req.params is None and now > req.lease_until:
                log.warning(
                    "request_id=%s epoch=%d reservation expired: not claimed or renewed for %.0f s",
                    req.request_id,
                    req.epoch,
                    self.reservation_ttl_s,
                )
                self._finish(req, DeadlineExceeded("reservation expired"))
        for held in list(self.quarantine.values()):
            if now - held.quarantined_at > self.quarantine_timeout_s:
                log.warning(
                    "request_id=%s epoch=%d: no done notice from the prefill side after %.0f s in quarantine",
                    held.request_id,
                    held.epoch,
                    self.quarantine_timeout_s,
                )
                self._unquarantine(held, "the quarantine timed out")

    def _update_gauges(self) -> None:
        KV_BLOCKS.labels("decode", "used").set(self.blocks_used)
        KV_BLOCKS.labels("decode", "free").set(self.blocks_free)
        KV_BLOCKS.labels("decode", "quarantined").set(
            sum(len(t) for req in self.quarantine.values() for t in req.tables.values())
        )
        QUEUE_DEPTH.labels("decode").set(len(self.requests))

    def close(self) -> None:
        with self.lock:
            self._stop = True
            for req in list(self.requests.values()):
                self._finish(req, Cancelled("the decode worker is shutting down"))
            self._release_quarantine_if_ending()
            self.lock.notify_all()
        self._thread.join(timeout=10)
        self.output.close()
        self.group.close()
