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


Emitted = tuple[Streamed, int | RingserveError, str | None]  # (request, token id or error, limit)


class OutputStage:
    """One thread that turns a request's tokens into its stream's events, in order.

    The loop adds a step's tokens with ``tokens`` and hands them over with ``flush`` while the next
    step runs on the device (``DecodeWorker._step``): this thread's text work then takes the
    interpreter while the loop waits for the device, instead of delaying the next step's launch.
    An error flushes at once, after the tokens added before it."""

    def __init__(self):
        self._items: queue.Queue = queue.Queue()
        self._pending: list[Emitted] = []
        self._lock = threading.Lock()  # pending: the loop adds and flushes; errors come from any thread
        self._thread = threading.Thread(target=self._run, name="decode-output", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def tokens(self, step: list[Emitted]) -> None:
        """Add sampled tokens, one (request, token, limit) each (delivered at the next ``flush``);
        ``limit`` ("length") when the loop ended the request with it."""
        with self._lock:
            self._pending += step

    def flush(self) -> None:
        """Hand what was added over to this thread (one queue item: each put wakes it)."""
        with self._lock:
            items, self._pending = self._pending, []
        if items:
            self._items.put(items)

    def error(self, req: Streamed, error: RingserveError) -> None:
        """Deliver the error that ends a request's stream, after the tokens added before it."""
        with self._lock:
            self._pending.append((req, error, None))
        self.flush()

    def close(self) -> None:
        """Deliver what is queued, then stop."""
        self.flush()
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
