"""The decode group's output stage: sampled token ids -> text and stream events, off the step.

The decode loop hands each request's tokens (and its errors) here in order and goes on with the
next step; this thread detokenizes, applies stop tokens and stop strings (``TextOutput``) and puts
the events a Decode stream reads. Text work therefore never holds the worker's lock or delays a
step. A stop found here reaches the loop as ``request.stopped``; the loop ends the request before
its next step (a token it sampled meanwhile is dropped, never shown).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Protocol

from ringserve.engine.engine import TokenEvent
from ringserve.engine.output import TextOutput
from ringserve.errors import RingserveError

log = logging.getLogger(__name__)


class Streamed(Protocol):
    """What the output stage needs of a request (decode_service.worker.Request)."""

    request_id: str
    output: TextOutput | None
    events: queue.Queue
    stopped: bool
    closed: bool


Emitted = tuple[Streamed, int, str | None]  # (request, token id, limit) handed over by the loop


class OutputStage:
    """One thread that turns a request's tokens into its stream's events, in order."""

    def __init__(self):
        self._items: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="decode-output", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def tokens(self, step: list[Emitted]) -> None:
        """Queue a step's sampled tokens, one (request, token, limit) each; ``limit`` ("length")
        when the loop ended the request with it. One hand-over per step, not per token: each put
        wakes this thread, which then contends with the loop for the interpreter."""
        if step:
            self._items.put(step)

    def error(self, req: Streamed, error: RingserveError) -> None:
        """Queue the error that ends a request's stream (after the tokens queued before it)."""
        self._items.put([(req, error, None)])

    def close(self) -> None:
        """Deliver what is queued, then stop."""
        self._items.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (items := self._items.get()) is not None:
            for req, what, limit in items:
                if req.closed:  # its last event is out (a stop): later tokens and errors are dropped
                    continue
                try:
                    self._deliver(req, what, limit)
                except Exception as e:  # a bug or a tokenizer failure: this request ends, the rest go on
                    log.exception("request_id=%s output failed", req.request_id)
                    req.closed = req.stopped = True
                    why = f"output of request {req.request_id} failed: {type(e).__name__}: {e}"
                    req.events.put(RingserveError(why))

    @staticmethod
    def _deliver(req: Streamed, what: int | RingserveError, limit: str | None) -> None:
        if isinstance(what, RingserveError):
            req.closed = True
            req.events.put(what)
            return
        text, stopped = req.output.push(what)
        if limit and not stopped:
            text += req.output.finish()
        reason = "stop" if stopped else limit
        req.closed = reason is not None
        req.stopped = req.stopped or stopped
        req.events.put(TokenEvent(what, text, reason))
