"""A decode group's reservations: the lifecycle of a request's KV blocks on the leader.

``reserve`` picks the ranks that will hold a request's KV (one for short requests, more as the
context grows), takes blocks on each for its share of the prompt plus a bounded headroom (one
block's worth per rank: a generation budget never pins blocks it has not used), and says where the
prompt's KV goes. Each reservation has an epoch, unique for the worker's life, and a lease: unless
claimed (Decode) or renewed it expires. Each rank's KV receiver reports the rows that land; a row
counts once, and only for its reservation's epoch (the one count of landed rows is here).

Whatever ends a request frees its blocks in one place (``_end_reservation``), except that blocks a
NIXL WRITE may still reach go to quarantine first, until every row of the reservation has landed,
the prefill side says it is done with it, or ``--quarantine-timeout-s`` passes.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from ringserve.decode_service.group import DecodeGroup
from ringserve.decode_service.landed_rows import LandedRows
from ringserve.decode_service.protocol import Free, PrefillDone, Reserve, RowsLanded
from ringserve.engine.kv_cache import BlockAllocator, blocks_needed
from ringserve.engine.output import TextOutput
from ringserve.engine.sampling import SamplingParams
from ringserve.engine.tp import kv_heads
from ringserve.errors import InvalidArgument, ResourceExhausted, Unavailable
from ringserve.kv_transfer.plan import balanced_shares
from ringserve.kv_transfer.secret import deployment_secret
from ringserve.mesh import Layout
from ringserve.metrics import KV_BLOCKS, KV_DROPPED, QUEUE_DEPTH

log = logging.getLogger(__name__)


@dataclass
class DecodeRequest:
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
    prefill_group: str = ""  # the registry id of the prefill group its NIXL landings are for
    landed_rows: dict[int, LandedRows] = field(default_factory=dict)  # KVP rank -> its rows that landed
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
    """What ``reserve`` answers: the epoch, the lease, and per world rank (TP x KVP) taking a share
    (world rank, KV receiver address, first prompt position, prompt tokens, NIXL landing or b"",
    first global KV head, KV heads; 0 heads: every head)."""

    epoch: int
    lease_s: float
    targets: list[tuple[int, str, int, int, bytes, int, int]]


class Reservations:
    """The KV blocks of a decode group's requests, over all its ranks: placement and admission,
    epochs and leases, landed rows, quarantine. ``DecodeWorker`` adds the batching loop on top;
    methods marked so expect ``lock`` held."""

    def __init__(self, group: DecodeGroup, reservation_ttl_s: float, shard_tokens: int):
        self.group = group
        self.block_size = group.rank0.cache.block_size
        # The leader allocates every rank's blocks; rank 0's allocator is its cache's own.
        self.allocators = [group.rank0.cache.allocator] + [
            BlockAllocator(group.rank0.cache.allocator.num_blocks) for _ in range(1, group.world)
        ]
        self.max_context = group.model.config.max_position_embeddings
        self.reservation_ttl_s = reservation_ttl_s
        self.shard_tokens = shard_tokens
        self.landing_key = deployment_secret(group.cfg.deployment_secret_file)  # signs NIXL landings
        self.requests: dict[str, DecodeRequest] = {}
        self.quarantine: dict[int, DecodeRequest] = {}  # epoch -> an ended reservation whose blocks are held back
        self.quarantine_timeout_s = group.cfg.quarantine_timeout_s
        self.dropped: Counter[str] = Counter()  # landings and notices that counted nothing, by reason
        self._epochs = itertools.count(1)
        self.failure: str | None = None  # set when a rank dies: the group serves nothing more
        self._stop = False
        self.lock = threading.Condition()

    @property
    def blocks_used(self) -> int:
        return sum(a.num_used for a in self.allocators)

    @property
    def blocks_free(self) -> int:
        return sum(a.num_free for a in self.allocators)

    @property
    def blocks_total(self) -> int:
        return sum(a.num_blocks for a in self.allocators)

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

    def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int, prefill_group: str = "") -> Reservation:
        """Take blocks for the prompt and its generation on the ranks that will hold the request;
        answers its epoch, its lease (renew it with ``renew`` until ``start``) and where each
        rank's share of the prompt goes (the landing is empty when the group receives by TCP only;
        it names ``prefill_group``, the only prefill group that admits it)."""
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
            req = DecodeRequest(request_id, tables, dict(zip(ranks, shares)), prompt_tokens, budget, now)
            req.epoch, req.shares, req.prefill_group = next(self._epochs), dict(zip(ranks, shares)), prefill_group
            req.lease_until = now + self.reservation_ttl_s
            self.requests[request_id] = req
            for r, start, share in zip(ranks, starts, shares):
                self.group.call(r, Reserve(request_id, req.epoch, tables[r], start, share))
            targets = [
                (w, self.group.addresses[w], start, share, self._landing(w, req, r, share), *self._kv_heads(w))
                for r, start, share in zip(ranks, starts, shares)
                for w in Layout(self.group.tp, self.group.world).tp_ranks(r)
            ]
            req.nixl = any(t[4] for t in targets)  # a NIXL landing went out
            self._update_gauges()
        return Reservation(req.epoch, self.reservation_ttl_s, targets)

    def _landing(self, world_rank: int, req: DecodeRequest, rank: int, share: int) -> bytes:
        """World rank ``world_rank``'s landing for its KVP rank ``rank``'s share (the same blocks on
        every TP rank of it; its own NIXL agent and pool), for the request's prefill group."""
        template = self.group.templates[world_rank]
        if template is None:
            return b""
        from ringserve.kv_transfer.landing import landing_bytes

        expires = time.time() + self.reservation_ttl_s  # the prefill side admits it once, before this
        return landing_bytes(
            template, req.request_id, req.epoch, req.tables[rank], share, req.prefill_group, self.landing_key, expires
        )

    def _kv_heads(self, world_rank: int) -> tuple[int, int]:
        """(first global KV head, count) world rank ``world_rank`` holds; (0, 0): every head (TP 1)."""
        if self.group.tp == 1:
            return 0, 0
        heads = kv_heads(world_rank % self.group.tp, self.group.tp, self.group.model.tp.full_config.num_key_value_heads)
        return heads.start, len(heads)

    def renew(self, request_id: str, epoch: int) -> bool:
        """Extend the lease of reservation ``epoch`` (the router does, every lease/3, while the
        prefill tier works); False if it has ended (expired, released) or is another epoch."""
        with self.lock:
            req = self.requests.get(request_id)
            if req is None or req.epoch != epoch:
                return False
            req.lease_until = max(req.lease_until, time.monotonic() + self.reservation_ttl_s)
            return True

    def _landed(self, note: RowsLanded) -> None:
        """Rows of a rank's share of a reservation landed (from the ranks' KV receivers), of the
        rank's local KV heads ``note.heads`` (None: whole rows). A row counts once all its heads
        landed, and only for that epoch: a repeated push, or a notification for an ended
        reservation, adds nothing."""
        rank, request_id, epoch, first, count = note.rank, note.request_id, note.epoch, note.first, note.count
        where = f"request_id={request_id} epoch={epoch} transfer={note.transfer_id} rank={rank}"
        with self.lock:
            req = self.requests.get(request_id)
            if req is None or req.epoch != epoch:
                req = self.quarantine.get(epoch)
            if req is None or req.request_id != request_id:
                self._count_dropped("stale")
                log.warning("%s: %d KV rows landed for no live reservation; ignored", where, count)
                return
            # A KVP rank's rows are complete once every head of each of its TP ranks landed: count
            # them over the TP ranks' heads together (TP rank t's local head h is head t * local + h).
            kvp_rank, tp_rank = divmod(rank, self.group.tp)
            local = self.group.rank0.cache.k.shape[-2]
            rows = req.landed_rows.setdefault(kvp_rank, LandedRows(local * self.group.tp))
            inside = note.heads is None or (note.heads.stop <= local and rows.holds(note.heads))
            heads = range(local) if note.heads is None else note.heads
            if first < 0 or first + count > req.shares.get(kvp_rank, 0) or not inside:
                self._count_dropped("outside_share")
                log.warning("%s: KV rows [%d, %d) are outside the rank's share; ignored", where, first, first + count)
                return
            added = rows.add(first, first + count, range(heads.start + tp_rank * local, heads.stop + tp_rank * local))
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

    def _prefill_done(self, note: PrefillDone) -> None:
        """The prefill side WRITEs nothing more for a reservation (its NIXL "done")."""
        request_id, epoch = note.request_id, note.epoch
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

    def _unquarantine(self, req: DecodeRequest, why: str) -> None:
        """Free a quarantined reservation's blocks (caller holds the lock)."""
        del self.quarantine[req.epoch]
        blocks = sum(len(t) for t in req.tables.values())
        for r, table in req.tables.items():
            self.allocators[r].free(table)
        req.tables = {}
        log.info("request_id=%s epoch=%d: %d quarantined blocks freed: %s", req.request_id, req.epoch, blocks, why)
        self._update_gauges()

    def _expire_quarantine(self, now: float) -> None:
        """Free quarantined blocks whose done notice never came (caller holds the lock)."""
        for held in list(self.quarantine.values()):
            if now - held.quarantined_at > self.quarantine_timeout_s:
                log.warning(
                    "request_id=%s epoch=%d: no done notice from the prefill side after %.0f s in quarantine",
                    held.request_id,
                    held.epoch,
                    self.quarantine_timeout_s,
                )
                self._unquarantine(held, "the quarantine timed out")

    def _expired_leases(self, now: float) -> list[DecodeRequest]:
        """Reservations never claimed whose lease has passed (caller holds the lock; the caller ends them)."""
        expired = [req for req in self.requests.values() if req.params is None and now > req.lease_until]
        for req in expired:
            log.warning(
                "request_id=%s epoch=%d reservation expired: not claimed or renewed for %.0f s",
                req.request_id,
                req.epoch,
                self.reservation_ttl_s,
            )
        return expired

    def _end_reservation(self, req: DecodeRequest) -> bool:
        """Take a request out of the book and free its blocks on every rank (caller holds the lock);
        False if it had ended already. Blocks a NIXL WRITE may still reach (a landing handed out,
        rows missing, the prefill side not done) go to quarantine instead, unless the group is
        broken or stopping (nothing reuses them then)."""
        if self.requests.pop(req.request_id, None) is None:
            return False
        for r in req.tables:
            self.group.call(r, Free(req.request_id, req.epoch))
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
        self._update_gauges()
        return True

    def _update_gauges(self) -> None:
        KV_BLOCKS.labels("decode", "used").set(self.blocks_used)
        KV_BLOCKS.labels("decode", "free").set(self.blocks_free)
        KV_BLOCKS.labels("decode", "quarantined").set(
            sum(len(t) for req in self.quarantine.values() for t in req.tables.values())
        )
        QUEUE_DEPTH.labels("decode").set(len(self.requests))
