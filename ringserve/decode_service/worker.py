"""The decode worker: a paged KV cache, reservations for incoming KV, and continuous batching.

A request goes through three states here:

1. reserved: ``reserve`` takes blocks for its prompt and its whole generation (so it can never
   run out mid-stream) and says where the prompt's KV should be written;
2. landing: the KV receiver writes rows into those blocks (``write_kv``);
3. active: ``start`` adds it to the running batch; every step decodes one token for each active
   request in one forward, and new requests join between steps.

Whatever ends a request (finish, cancel, release, an error, a reservation never claimed) frees
its blocks, in one place: ``_finish``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from ringserve.engine.engine import TokenEvent
from ringserve.engine.kv_cache import KVCache, PagedAttention, SeqSpan, blocks_needed
from ringserve.engine.model import Llama
from ringserve.engine.output import TextOutput
from ringserve.engine.sampling import SamplingParams, sample
from ringserve.engine.tokenizer import Tokenizer
from ringserve.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RingserveError,
)
from ringserve.metrics import KV_BLOCKS, QUEUE_DEPTH

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One request's state on this worker."""

    request_id: str
    block_table: list[int]
    prompt_len: int
    max_tokens: int  # generation budget, already capped by the model's context
    reserved_at: float
    landed: int = 0  # prompt tokens whose KV has arrived
    # Set by start():
    token_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    generated: int = 0
    params: SamplingParams | None = None
    output: TextOutput | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False


class DecodeWorker:
    """Owns the model and KV cache of one decode process; thread-safe."""

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        num_blocks: int,
        block_size: int = 64,
        reservation_ttl_s: float = 120.0,
        max_batch: int = 64,
    ):
        self.model, self.tokenizer = model, tokenizer
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(model.config, num_blocks, block_size, dtype=param.dtype, device=param.device)
        self.max_context = model.config.max_position_embeddings
        self.reservation_ttl_s = reservation_ttl_s
        self.max_batch = max_batch
        self.kv_address = ""  # set by the service once its KV receiver listens
        self.requests: dict[str, Request] = {}
        self.active: list[Request] = []
        self.lock = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self._thread.start()
        self._update_gauges()

    # --- reservations and KV landing --------------------------------------------------------

    def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int) -> list[tuple[int, str, int, int]]:
        """Take blocks for the prompt and its generation; returns [(rank, address, first, count)]."""
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
        with self.lock:
            if request_id in self.requests:
                raise InvalidArgument(f"request {request_id} is already reserved on this decode worker")
            # The last generated token is never fed back, so prompt + budget - 1 rows suffice.
            blocks = self.cache.allocator.allocate(blocks_needed(prompt_tokens + budget - 1, self.cache.block_size))
            self.requests[request_id] = Request(request_id, blocks, prompt_tokens, budget, time.monotonic())
            self._update_gauges()
        return [(0, self.kv_address, 0, prompt_tokens)]

    def write_kv(self, request_id: str, first_position: int, kv: torch.Tensor) -> None:
        """Store prompt KV rows [layers, 2, n, Hkv, D] at cache positions first_position.. of a reservation."""
        with self.lock:
            req = self.requests.get(request_id)
            if req is None:
                raise NotFound(f"no reservation for request {request_id} (expired or released?)")
            n = kv.shape[2]
            if first_position < 0 or first_position + n > req.prompt_len:
                raise InvalidArgument(
                    f"KV rows [{first_position}, {first_position + n}) are outside the prompt of {req.prompt_len}"
                )
            expected = (self.model.config.num_hidden_layers, 2, n, *self.cache.k.shape[-2:])
            if tuple(kv.shape) != expected:
                raise InvalidArgument(f"KV shape {tuple(kv.shape)} does not match this model's {expected}")
            slots = self.cache.slots(req.block_table, first_position, first_position + n)
        kv = kv.to(self.device)
        for layer in range(kv.shape[0]):
            self.cache.write(layer, slots, kv[layer, 0], kv[layer, 1])
        with self.lock:
            req.landed += n

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
            if req.landed != req.prompt_len:
                raise FailedPrecondition(
                    f"only {req.landed} of {req.prompt_len} prompt tokens' KV arrived for request {request_id}"
                )
            req.params = params
            req.max_tokens = min(req.max_tokens, params.max_tokens)
            req.output = TextOutput(self.tokenizer, params)
            req.token_ids = list(prompt_ids)
            req.num_cached = req.prompt_len
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
        self.cache.allocator.free(req.block_table)
        req.block_table = []
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
            except Exception as e:  # fail the batch, keep the worker alive
                log.exception("decode step failed")
                with self.lock:
                    for req in batch:
                        self._finish(req, RingserveError(f"decode step failed: {type(e).__name__}: {e}"))
                continue
            with self.lock:
                for i, req in enumerate(batch):
                    req.num_cached += 1
                    if req.cancelled:
                        self._finish(req, Cancelled(f"request {req.request_id} was cancelled"))
                        continue
                    self._emit(req, sample(logits[i], req.params, req.params.generator(req.generated)))
                # Rotate so that more requests than max_batch take turns.
                stepped = {id(r) for r in batch}
                self.active = [r for r in self.active if id(r) not in stepped] + [
                    r for r in self.active if id(r) in stepped
                ]

    @torch.inference_mode()
    def _forward(self, batch: list[Request]) -> torch.Tensor:
        ids = torch.tensor([r.token_ids[-1] for r in batch], device=self.device)
        positions = torch.tensor([len(r.token_ids) - 1 for r in batch], device=self.device)
        spans = [SeqSpan(i, i + 1, r.block_table, r.num_cached) for i, r in enumerate(batch)]
        return self.model(ids, positions, PagedAttention(self.cache, spans))

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
        KV_BLOCKS.labels("decode", "used").set(self.cache.allocator.num_used)
        KV_BLOCKS.labels("decode", "free").set(self.cache.allocator.num_free)
        QUEUE_DEPTH.labels("decode").set(len(self.requests))

    def close(self) -> None:
        with self.lock:
            self._stop = True
            for req in list(self.requests.values()):
                self._finish(req, Cancelled("the decode worker is shutting down"))
            self.lock.notify_all()
        self._thread.join(timeout=10)
