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
    ):
        super().__init__(group, reservation_ttl_s, shard_tokens)
        self.tokenizer = tokenizer
        self.model = group.model
        self.device = group.rank0.device
        self.max_batch = max_batch
        self.landing_timeout_s = landing_timeout_s
        self.active: list[DecodeRequest] = []
        self.on_failure: Callable[[], None] | None = None  # e.g. fail the liveness probe: restart us
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
        the error if any (caller holds the lock); idempotent."""
        if req in self.active:
            self.active.remove(req)
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
        """Plan, run and sample one step; False when the worker stops."""
        with self.lock:
            self._drop_cancelled_and_expired()
            while not self.active and not self._stop:
                self.output.flush()  # the last step's tokens: no step comes to hand them over
                self.lock.wait(timeout=1.0)
                self._drop_cancelled_and_expired()
            if self._stop or self.failure:
                return False
            batch, entries = self._plan()
        if not batch:
            return True
        if self.device.type == "cpu":  # a CPU forward is done when it returns: hand over first
            self.output.flush()
        try:
            logits = self._forward(batch, entries)
        except Exception as e:
            log.exception("decode step failed")
            if self.group.size > 1:  # the ranks may be out of step now: the group is done
                self._group_failed(f"a decode step failed: {type(e).__name__}: {e}")
                return True
            with self.lock:  # one rank: fail the batch, keep the worker alive
                for req in batch:
                    self._finish(req, RingserveError(f"decode step failed: {type(e).__name__}: {e}"))
            return True
        params = [r.params for r in batch]
        # Only sampled rows draw: greedy rows need no generator (making one costs an OS seed).
        generators = [p.generator(r.generated) if p.temperature > 0 else None for p, r in zip(params, batch)]
        picks = sample_batch(logits, params, generators)
        self.output.flush()  # the last step's text work, while this (launched) step runs on the GPU
        sampled = picks.tolist()  # one copy to the host
        out: list[Emitted] = []
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
                    self._emit(req, token, out)
            self.output.tokens(out)
            # Rotate so that more requests than max_batch (and paused ones) take turns.
            stepped = {id(r) for r in batch}
            self.active = [r for r in self.active if id(r) not in stepped] + [
                r for r in self.active if id(r) in stepped
            ]
        return True

    def _plan(self) -> tuple[list[DecodeRequest], list[StepEntry]]:
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

    def _forward(self, batch: list[DecodeRequest], entries: list[StepEntry]) -> torch.Tensor:
        """One decode step over the group."""
        # A step whose requests all live on rank 0 alone needs no other rank and no communication.
        group_wide = any(set(r.rows) != {0} for r in batch)
        self.group.send_step(entries, group_wide)
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
