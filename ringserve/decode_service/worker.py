"""The decode worker: the scheduler of a KVP decode group (it runs in the leader, rank 0).

A request is reserved, then its KV lands (``reservations.Reservations``: blocks, epochs, leases,
landed rows, quarantine); ``start`` adds it to the running batch; every step decodes one token for
each active request in one forward over the group, and new requests join between steps. A
request's blocks grow as it generates (the rank that stores the new token takes a block when its
last is full); a request with no free slot on any of its ranks sits out steps until blocks free
up, and when every running request is stuck the youngest ends with RESOURCE_EXHAUSTED (no
deadlock). Admission keeps one free block per request on a rank for that growth (the watermark).

Each step samples the whole batch in one call and copies the tokens to the host once; text, stop
strings and stream events are the output stage's (decode_service/stream.py), off the step. A
request whose logits cannot be sampled (NaN) ends alone with an error; if the loop itself fails,
every request ends with UNAVAILABLE and the group is marked failed (``on_failure``: liveness).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from ringserve.decode_service.group import DecodeGroup
from ringserve.decode_service.kvp import StepEntry
from ringserve.decode_service.protocol import Extend
from ringserve.decode_service.reservations import DecodeRequest, Reservations
from ringserve.decode_service.stream import Emitted, OutputStage
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

log = logging.getLogger(__name__)


class DecodeWorker(Reservations):
    """Schedules a decode group's requests: admission (``Reservations``), batching, sampling; thread-safe."""

    def __init__(
        self,
        group: DecodeGroup,
        tokenizer: Tokenizer,
        reservation_ttl_s: float = 120.0,
        max_batch: int = 64,
        shard_tokens: int = 32768,
        landing_timeout_s: float = 10.0,
        overlap: bool | None = None,
    ):
        """``overlap``: launch each step before taking the tokens of the one before (``_step``);
        None: on a GPU. Only a one-rank group can (the other ranks need each step's tokens), and
        on CPU, where a forward is done when it returns, it would only hold tokens back a step."""
        super().__init__(group, reservation_ttl_s, shard_tokens)
        self.tokenizer = tokenizer
        self.model = group.model
        self.device = group.rank0.device
        self.max_batch = max_batch
        self.overlap = (self.device.type == "cuda" if overlap is None else overlap) and group.size == 1
        self.landing_timeout_s = landing_timeout_s
        self.active: list[DecodeRequest] = []
        self.on_failure: Callable[[], None] | None = None  # e.g. fail the liveness probe: restart us
        self._in_flight: list[_Step] = []  # launched steps whose tokens the host has not taken yet
        self._deferred: list[tuple[DecodeRequest, RingserveError | None]] = []  # ends after a step in flight
        self.output = OutputStage()
        group.start_monitor(self._landed, self._prefill_done, self._group_failed)
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self._thread.start()
        self._update_gauges()

    @property
    def serving(self) -> bool:
        """False once the group failed or the loop or output thread is gone (streams must end)."""
        return self.failure is None and self._thread.is_alive() and self.output.alive

    # --- decoding ---------------------------------------------------------------------------

    def start(self, request_id: str, prompt_tokens: int, first_token: int, params: SamplingParams) -> DecodeRequest:
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
            out: list[Emitted] = []
            if not self._emit(req, first_token, out):
                self.active.append(req)
                self.lock.notify_all()
            self.output.tokens(out)
            self.output.flush()  # no step may be coming to flush it
            self._update_gauges()
        return req

    def fail_reserved(self, request_id: str, error: RingserveError) -> None:
        """End a reservation whose Decode call failed before it could start (no-op once decoding)."""
        with self.lock:
            req = self.requests.get(request_id)
            if req is not None and req.params is None:
                self._finish(req, error)

    def _check_start(self, req: DecodeRequest, prompt_tokens: int, first_token: int, params: SamplingParams) -> None:
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

    def _emit(self, req: DecodeRequest, token: int, out: list[Emitted]) -> bool:
        """Record a sampled token and add it to ``out``, the step's tokens for the output stage
        (added there in one piece; ``OutputStage.flush`` hands them over); True if the request is done (at
        its budget or the context: stop tokens and strings are the output stage's to find)."""
        req.last_token = token
        req.generated += 1
        done = req.generated >= req.max_tokens or req.prompt_len + req.generated >= self.max_context
        out.append((req, token, "length" if done else None))
        if done:
            self._finish(req, None)
        return done

    def _finish(self, req: DecodeRequest, error: RingserveError | None) -> None:
        """End a request: out of the batch, its blocks freed (``_end_reservation``), its stream told
        the error if any (caller holds the lock); idempotent. A request in a step still running
        on the device ends once that step is done: the step writes its new KV into its blocks."""
        if req in self.active:
            self.active.remove(req)
        if not self._ending() and any(id(req) in step.members for step in self._in_flight):
            self._deferred.append((req, error))
            return
        if self._end_reservation(req) and error is not None:
            self.output.error(req, error)  # after the tokens already queued for the stream

    def _loop(self) -> None:
        try:
            while self._step():
                pass
        except Exception as e:  # the loop cannot go on: nothing would ever end the streams otherwise
            log.exception("decode loop failed")
            self._group_failed(f"the decode loop failed: {type(e).__name__}: {e}")

    def _step(self) -> bool:
        """Plan and launch one step, then take the tokens of the step before it; False when the
        worker stops. With ``overlap`` step N+1 is launched with step N's tokens still on the
        device (its inputs read them there), and the host takes step N's tokens (streams, stops,
        finished requests) while the device runs step N+1; without, each step is taken at once."""
        with self.lock:
            self._drop_cancelled_and_expired()
            while not self.active and not self._in_flight and not self._stop:
                self.lock.wait(timeout=1.0)
                self._drop_cancelled_and_expired()
            if self._stop or self.failure:
                return False
            batch, entries, done = self._plan()
        step = self._launch(batch, entries, done) if batch else None
        if self._in_flight and self._in_flight[0] is not step:
            self._take(self._in_flight[0])
        if step is not None and not self.overlap:
            self._take(step)
        return True

    def _launch(self, batch: list[DecodeRequest], entries: list[StepEntry], done: list[int]) -> _Step | None:
        """Run a step's forward and sampling on the device (not waiting for them); the step is in
        flight until ``_take``. None if it failed (then the batch has ended with the error)."""
        prev = self._in_flight[-1].picks if self._in_flight else None
        try:
            logits = self._forward(batch, entries, prev)
        except Exception as e:
            log.exception("decode step failed")
            if self.group.size > 1:  # the ranks may be out of step now: the group is done
                self._group_failed(f"a decode step failed: {type(e).__name__}: {e}")
                return None
            if self._in_flight:
                self._take(self._in_flight[0])
            with self.lock:  # one rank: fail the batch, keep the worker alive
                for req in batch:
                    self._finish(req, RingserveError(f"decode step failed: {type(e).__name__}: {e}"))
            return None
        params = [r.params for r in batch]
        # Only sampled rows draw: greedy rows need no generator (making one costs an OS seed).
        generators = [p.generator(n) if p.temperature > 0 else None for p, n in zip(params, done)]
        picks = sample_batch(logits, params, generators)
        step = _Step(batch, picks)
        with self.lock:
            self._in_flight.append(step)
        return step

    def _take(self, step: _Step) -> None:
        """Wait for a step's tokens and hand them on: streams, finished and failed requests."""
        sampled = step.tokens()
        out: list[Emitted] = []
        with self.lock:
            self._in_flight.remove(step)
            ending = {id(r) for r, _ in self._deferred}
            for req, (token, ok) in zip(step.batch, sampled):
                if self.requests.get(req.request_id) is not req or id(req) in ending:  # ended meanwhile
                    continue
                if req.cancelled:
                    self._finish(req, Cancelled(f"request {req.request_id} was cancelled"))
                elif not ok:
                    why = "the model's logits are not finite (NaN or inf); it cannot go on"
                    self._finish(req, RingserveError(f"request {req.request_id}: {why}"))
                else:
                    self._emit(req, token, out)
            self.output.tokens(out)
            deferred, self._deferred = self._deferred, []
            for req, error in deferred:  # those not in the step still running end now
                self._finish(req, error)
            # Rotate so that more requests than max_batch (and paused ones) take turns.
            stepped = step.members
            self.active = [r for r in self.active if id(r) not in stepped] + [
                r for r in self.active if id(r) in stepped
            ]
            self.lock.notify_all()
        self.output.flush()

    def _plan(self) -> tuple[list[DecodeRequest], list[StepEntry], list[int]]:
        """The next step's requests, their entries and how many tokens each has before this one
        (caller holds the lock): ends stopped and cancelled requests, picks each request's owner
        rank for its new token, growing its blocks there; skips requests with no free slot; ends
        the youngest when none can step. A request in the step in flight counts its token there
        (the entry's token id -1 - j: row j of that step's picks, still on the device), and one
        that token ends is left out."""
        for req in list(self.active):
            if req.cancelled:
                self._finish(req, Cancelled(f"request {req.request_id} was cancelled"))
            elif req.stopped:
                self._finish(req, None)
        rows = {id(r): j for j, r in enumerate(self._in_flight[-1].batch)} if self._in_flight else {}
        batch, entries, done, paused = [], [], [], False
        for req in self.active:
            if len(batch) == self.max_batch:
                break
            row = rows.get(id(req))
            n = req.generated + (row is not None)
            if n >= req.max_tokens or req.prompt_len + n >= self.max_context:
                continue  # the token in flight is its last
            owner = self._owner(req)
            if owner is None:
                paused = True  # until blocks free up
                continue
            req.rows[owner] += 1
            batch.append(req)
            token = req.last_token if row is None else -1 - row
            entries.append(StepEntry(req.request_id, token, req.prompt_len + n - 1, owner))
            done.append(n)
        if paused and not batch and not self._in_flight:
            youngest = max(self.active, key=lambda r: r.started_at)
            log.warning("request_id=%s ended: every running request is out of KV blocks", youngest.request_id)
            self._finish(youngest, ResourceExhausted("decode KV cache full; retry"))
        return batch, entries, done

    def _owner(self, req: DecodeRequest) -> int | None:
        """The rank that stores a request's next token: the one with the fewest of its rows (ties:
        the lowest), keeping shards balanced, that has a free slot or can take a block for one."""
        for rank in sorted(req.rows, key=lambda r: (req.rows[r], r)):
            if req.rows[rank] < len(req.tables[rank]) * self.block_size:
                return rank
            if self.allocators[rank].num_free:
                block = self.allocators[rank].allocate(1)
                req.tables[rank] = req.tables[rank] + block  # a new list: rank 0's shard keeps its own
                self.group.call(rank, Extend(req.request_id, block))
                self._update_gauges()
                return rank
        return None

    def _forward(self, batch: list[DecodeRequest], entries: list[StepEntry], prev: torch.Tensor | None) -> torch.Tensor:
        """One decode step over the group (``prev``: the picks of the step in flight, one rank only)."""
        # A step whose requests all live on rank 0 alone needs no other rank and no communication.
        group_wide = any(set(r.rows) != {0} for r in batch)
        self.group.send_step(entries, group_wide)
        return self.group.rank0.step(entries, group_wide, prev)

    def _group_failed(self, what: str) -> None:
        """A rank died or failed: end every request with UNAVAILABLE and refuse new ones."""
        log.error("decode group failed: %s; every request on it ends", what)
        with self.lock:
            self.failure = self.failure or what
            failed = list(self.requests.values())
            self.active.clear()
            for req in failed:  # every block back before any stream hears of it (callers count them)
                self._end_reservation(req)
            for req in failed:
                self.output.error(req, Unavailable(f"decode group failed: {what}"))
            self.lock.notify_all()
        if self.on_failure is not None:
            self.on_failure()

    def _drop_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        self._release_quarantine_if_ending()
        for req in list(self.requests.values()):
            if req.cancelled and req not in self.active:
                self._finish(req, Cancelled(f"request {req.request_id} was cancelled"))
        for req in self._expired_leases(now):
            self._finish(req, DeadlineExceeded("reservation expired"))
        self._expire_quarantine(now)

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


class _Step:
    """A launched decode step: its requests and their picks [B, 2] (token, ok) on the device, with
    a copy to the host started at once (so taking them later waits for this step only)."""

    def __init__(self, batch: list[DecodeRequest], picks: torch.Tensor):
        self.batch, self.picks = batch, picks
        self.members = {id(r) for r in batch}  # by identity: DecodeRequest compares by value, slowly
        self.host = picks.to("cpu", non_blocking=True)  # pinned: the copy is queued behind the step
        self.done = torch.cuda.Event() if picks.is_cuda else None
        if self.done is not None:
            self.done.record()

    def tokens(self) -> list[list[int]]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()
