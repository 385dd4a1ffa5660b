"""One request's life in the router: ``RequestRun`` owns it from validation to its last message.

Stages, each owning its cleanup:

- reserve: ``Decode.Reserve`` on the picked decode group. The reservation (``Reservation``) is
  released (``Decode.Release``) on every path unless the decode stream ran to its end. A group that
  answers UNAVAILABLE (dead, broken, draining) is marked down and one that answers
  RESOURCE_EXHAUSTED (full) is left by this request; either way the next decode group is tried.
- prefill: ``Prefill.Prefill`` on the picked prefill group; while it runs, the reservation is
  renewed every lease_seconds / 3. UNAVAILABLE: the prefill group is marked down and the request
  moves to another, with a new reservation (one reservation is only ever given to one prefill
  group: a failed group's late WRITE or "done" must not meet the next one's). ABORTED (the KV
  push to the decode group failed: that group's fault): the reservation is released, another
  decode group reserves, and the same prefill group (which now holds the prompt in its prefix
  cache) runs it again.
- decode: the ``Decode.Decode`` stream, relayed to the client. A decode group that dies
  mid-stream (UNAVAILABLE) is marked down and the request migrates, up to ``--migration-limit``
  times: prompt + the tokens generated so far are prefilled again (the prefill group's cache
  usually holds the prompt), another decode group reserves for the rest of the budget, and its
  stream continues the client's. Greedy output is the same as without the failure (text held back
  by the dead group, an incomplete character or a stop string cut by the move, is not recovered;
  seeded sampling restarts its per-step seeds).

At most ``_ATTEMPTS`` groups per role. Every downstream call is a future or a stream held in
``_call``: a client that cancels (or whose deadline passes) is heard at once, at any stage, and
the call in flight is cancelled, which frees what it holds downstream (a cancelled prefill is
dropped by its group). Ids downstream are the router's own (``RequestRun.id``, unique per
request), so cleanup can only touch what this request created; the client's request_id is a
label in logs and in its responses. Downstream failures are logged with their detail; the
client's message says which groups failed and where the request was retried, nothing internal.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from ringserve.errors import (
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    RingserveError,
    Unavailable,
    error_from_code,
)
from ringserve.metrics import QUEUE_DEPTH, TPOT, TTFT
from ringserve.router.balancer import Decision, Group
from ringserve.rpc import check_ttft_slo, sampling_from_proto
from ringserve.v1 import common_pb2, decode_pb2, prefill_pb2, router_pb2

log = logging.getLogger(__name__)

_ATTEMPTS = 3  # per role: the picked group and two others
# Downstream statuses whose message is written for the client: passed on as they are.
_USER_FACING = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND,
}


@dataclass
class Reservation:
    """A decode reservation this request made (or may have made: a Reserve cut short)."""

    group: Group
    reply: decode_pb2.ReserveResponse | None = None  # None until Reserve answered
    handed_out: bool = False  # its targets may have reached a prefill group (which may WRITE into them)


def _never_reached_prefill(error: grpc.RpcError) -> bool:
    """Whether a failed Prefill call never reached the group's scheduler: no connection, or refused
    by a draining group's gate. (Refusals by the servicer itself tell the decode side "done".)"""
    details = error.details() or ""
    unavailable = error.code() == grpc.StatusCode.UNAVAILABLE
    return unavailable and ("failed to connect to all addresses" in details or "is draining" in details)


class RequestRun:
    """One Generate call; ``run()`` yields its responses. See the module docstring."""

    def __init__(self, router, request: router_pb2.GenerateRequest, context: grpc.ServicerContext):
        self.router, self.balancer, self.request, self.context = router, router.balancer, request, context
        self.id = uuid.uuid4().hex  # the router's id for this request: every downstream call uses it
        self.label = request.request_id or self.id  # the client's id: in logs and in its responses
        self.t_start = time.perf_counter()
        self.params = sampling_from_proto(request.sampling)  # validates
        self.decision: Decision | None = None  # set by run(): the groups it runs on
        self.reservation: Reservation | None = None
        self.failures: list[str] = []  # what failed downstream and where it went next, for the client
        self.attempts = {"prefill": 0, "decode": 0}
        self.generated: list[int] = []  # tokens streamed to the client so far
        self.migrations = 0
        self.cached_prompt_tokens = 0
        self.t_first = 0.0  # when the first token reached the client
        self.prefilling = False  # the decision counts the prompt as pending at its prefill group
        self._lock = threading.Lock()
        self._cancelled = False
        self._call = None  # the downstream call in flight: a gRPC future or stream

    # -- the request's owner ----------------------------------------------------------------------

    def run(self) -> Iterator[router_pb2.GenerateResponse]:
        """Validate, route, reserve, prefill, stream the decode; release everything on every path."""
        if not self.context.add_callback(self.cancel):
            raise Cancelled(f"request {self.label}: the client went away before it started")
        ids = self.router.prompt_ids(self.request)
        self.params.validate_for(self.router.model.vocab_size, self.router.model.max_context)
        check_ttft_slo(self.request.ttft_slo_seconds)
        self.decision = self.balancer.pick(ids, self.params.max_tokens)
        self.prefilling = True
        QUEUE_DEPTH.labels("router").inc()
        try:
            first = self._reserve_and_prefill(ids, self.params.max_tokens)
            self.cached_prompt_tokens = first.cached_prompt_tokens  # of the client's prompt, for its Usage
            while (yield from self._decode(ids, first)):
                first = self._migrate(ids)
        finally:
            QUEUE_DEPTH.labels("router").dec()
            self._prefill_done()
            self.balancer.release(self.decision, "decode")
            self._release_reservation()

    def _prefill_done(self) -> None:
        if self.prefilling:
            self.prefilling = False
            self.balancer.release(self.decision, "prefill")

    def cancel(self) -> None:
        """The client's call ended (cancelled, deadline, or done): cancel the downstream call in flight."""
        with self._lock:
            self._cancelled = True
            call = self._call
        if call is not None:
            call.cancel()  # a no-op on a call that has finished

    def _start(self, start: Callable[[], grpc.Future]) -> grpc.Future:
        """Issue a downstream call (unless the client is gone), as the one in flight."""
        with self._lock:
            if self._cancelled:
                raise Cancelled(f"request {self.label}: the client cancelled")
            self._call = start()
            return self._call

    def _result(self, future: grpc.Future, every_s: float | None = None, tick: Callable[[], None] | None = None):
        """The call's reply (its RpcError raised as it is); ``tick()`` every ``every_s`` while waiting."""
        while True:
            try:
                return future.result(timeout=every_s)
            except grpc.FutureTimeoutError:
                tick()
            except grpc.FutureCancelledError:
                raise Cancelled(f"request {self.label}: the client cancelled") from None

    def _timeout(self) -> float | None:
        """What is left of the client's deadline, for a downstream call."""
        remaining = self.context.time_remaining()
        if remaining is None or remaining > 1e7:  # no deadline set (gRPC reports a huge number)
            return None
        if remaining <= 0:
            raise DeadlineExceeded(f"request {self.label}: the deadline passed")
        return remaining

    # -- failures ---------------------------------------------------------------------------------

    def _failed(self, role: str, error: grpc.RpcError, down: bool = True, keep_if_alone: bool = False) -> None:
        """``role``'s group failed this request: log the detail, move to another group, or raise."""
        group = self._log_failure(role, error)
        self.attempts[role] += 1
        self.failures.append(f"{role} group {group.address} failed ({error.code().name})")
        if self.attempts[role] < _ATTEMPTS and self.balancer.repick(self.decision, role, down, keep_if_alone):
            self.failures[-1] += f"; retried on {getattr(self.decision, role).address}"
            return
        summary = "; ".join(self.failures)
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise ResourceExhausted(
                f"request {self.label}: no decode group has room for it now ({summary}); retry later or shorten it"
            )
        raise Unavailable(f"request {self.label}: {summary}; no other {role} group to try")

    def _log_failure(self, role: str, error: grpc.RpcError) -> Group:
        """Log what ``role``'s group answered, in full (the client gets a summary); returns the group."""
        group = getattr(self.decision, role)
        log.warning(
            "request_id=%s client_request_id=%s %s group %s answered %s: %s",
            self.id,
            self.label,
            role,
            group.address,
            error.code().name,
            error.details(),
        )
        return group

    def _downstream(self, role: str, error: grpc.RpcError) -> RingserveError:
        """A status from ``role``'s group that ends the request, as the client's error."""
        if error.code() == grpc.StatusCode.CANCELLED and self._cancelled:
            return Cancelled(f"request {self.label}: the client cancelled")
        if error.code() in _USER_FACING:
            return error_from_code(error.code().name, error.details())
        group = self._log_failure(role, error)
        failures = "".join(f"{f}; " for f in self.failures)
        return Unavailable(
            f"request {self.label}: {failures}{role} group {group.address} failed ({error.code().name}); "
            "see the router's log"
        )

    # -- reserve ----------------------------------------------------------------------------------

    def _reserve(self, prompt_tokens: int, max_tokens: int) -> None:
        """A reservation on the decision's decode group, failing over to others; its landings are for the
        decision's prefill group (a new prefill group gets a new reservation: see the module docstring)."""
        request = decode_pb2.ReserveRequest(
            request_id=self.id,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            prefill_group=self.decision.prefill.id,
        )
        while True:
            group = self.decision.decode
            self.reservation = Reservation(group)  # released if Reserve is cut short: it may have landed
            future = self._start(lambda g=group: g.stub.Reserve.future(request, timeout=self._timeout()))
            try:
                self.reservation.reply = self._result(future)
                return
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.reservation = None  # the group answered: it reserved nothing
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self._failed("decode", e)
                elif e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self._failed("decode", e, down=False)  # full, not broken: other requests may fit
                else:
                    raise self._downstream("decode", e) from None

    def _renew(self) -> None:
        """Keep the reservation alive while the prefill runs (a long prompt must not lose it)."""
        r = self.reservation
        try:
            renewed = r.group.stub.Renew(
                decode_pb2.RenewRequest(request_id=self.id, epoch=r.reply.epoch),
                timeout=max(1.0, r.reply.lease_seconds / 3),
            ).renewed
        except grpc.RpcError as e:
            renewed = False
            log.warning("request_id=%s renewing the reservation failed: %s", self.id, e.details())
        if not renewed:
            log.warning("request_id=%s decode group %s did not renew the reservation", self.id, r.group.address)

    def _release_reservation(self) -> None:
        """Free this request's reservation, if it still holds one (idempotent downstream)."""
        r, self.reservation = self.reservation, None
        if r is None:
            return
        try:
            release = decode_pb2.ReleaseRequest(request_id=self.id, landing_unused=not r.handed_out)
            r.group.stub.Release(release, timeout=5)
        except grpc.RpcError as e:
            log.warning("request_id=%s could not release its reservation: %s", self.id, e.details())

    # -- prefill ----------------------------------------------------------------------------------

    def _reserve_and_prefill(self, ids: list[int], max_tokens: int) -> prefill_pb2.PrefillResponse:
        """Reserve, then prefill; fail over as the module docstring says."""
        while True:
            if self.reservation is None:
                self._reserve(len(ids), max_tokens)
            try:
                first = self._prefill(ids)
                self._prefill_done()
                return first
            except grpc.RpcError as e:
                if _never_reached_prefill(e):  # the group cannot WRITE what it never got: no quarantine
                    self.reservation.handed_out = False
                if e.code() == grpc.StatusCode.ABORTED:  # the KV push to the decode group failed
                    self._release_reservation()
                    self._failed("decode", e, keep_if_alone=True)
                elif e.code() == grpc.StatusCode.UNAVAILABLE:
                    # One reservation, one prefill group: the failed group's late "done" or WRITE
                    # must not meet the next group's, so the retry gets a new reservation (epoch).
                    self._release_reservation()
                    self._failed("prefill", e)
                else:
                    raise self._downstream("prefill", e) from None

    def _prefill(self, ids: list[int]) -> prefill_pb2.PrefillResponse:
        group, reply = self.decision.prefill, self.reservation.reply
        slo = self.request.ttft_slo_seconds
        request = prefill_pb2.PrefillRequest(
            request_id=self.id,
            token_ids=ids,
            sampling=self.request.sampling,
            targets=reply.targets,
            # What is left of the budget once the prefill group has the request.
            ttft_slo_seconds=max(1e-3, slo - (time.perf_counter() - self.t_start)) if slo else 0.0,
        )
        future = self._start(lambda: group.stub.Prefill.future(request, timeout=self._timeout()))
        self.reservation.handed_out = True  # from here the group may WRITE into the landings
        if reply.lease_seconds > 0:
            return self._result(future, reply.lease_seconds / 3, self._renew)
        return self._result(future)

    # -- decode -----------------------------------------------------------------------------------

    def _decode(self, ids: list[int], first: prefill_pb2.PrefillResponse) -> Iterator[router_pb2.GenerateResponse]:
        """Relay the decode stream; returns True when its group died mid-stream and the request may
        migrate (``ids``: the original prompt; what was generated before is in ``self.generated``)."""
        decision, offset = self.decision, len(self.generated)
        stream = self._start(
            lambda: decision.decode.stub.Decode(
                decode_pb2.DecodeRequest(
                    request_id=self.id,
                    prompt_tokens=len(ids) + len(self.generated),
                    first_token=first.first_token,
                    sampling=self.request.sampling,
                ),
                timeout=self._timeout(),
            )
        )
        log.info(
            "request_id=%s client_request_id=%s prompt_tokens=%d generated=%d prefill=%s decode=%s policy=%s "
            "expected_cached_tokens=%d strategy=%s",
            self.id,
            self.label,
            len(ids),
            offset,
            decision.prefill.address,
            decision.decode.address,
            decision.policy,
            decision.cached_tokens,
            first.strategy,
        )
        try:
            for msg in stream:
                self.generated.extend(msg.token_ids)
                if not self.t_first:
                    self.t_first = time.perf_counter()
                    TTFT.observe(self.t_first - self.t_start)
                yield self._response(ids, msg, offset)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise self._downstream("decode", e) from None
            self.balancer.mark_down(decision.decode)
            if self.migrations >= self.router.migration_limit:
                raise self._downstream("decode", e) from None
            self._log_failure("decode", e)
            self.failures.append(f"decode group {decision.decode.address} failed mid-stream ({e.code().name})")
            return True
        return False

    def _response(self, ids: list[int], msg: decode_pb2.DecodeResponse, offset: int) -> router_pb2.GenerateResponse:
        usage = None
        if msg.finish_reason:
            self.reservation = None  # the decode group freed it when the stream ended
            completion = offset + msg.completion_tokens
            usage = common_pb2.Usage(
                prompt_tokens=len(ids), completion_tokens=completion, cached_prompt_tokens=self.cached_prompt_tokens
            )
            if completion > 1:
                TPOT.observe((time.perf_counter() - self.t_first) / (completion - 1))
        return router_pb2.GenerateResponse(
            request_id=self.label,
            text=msg.text,
            token_ids=msg.token_ids,
            finish_reason=msg.finish_reason,
            usage=usage,
        )

    def _migrate(self, ids: list[int]) -> prefill_pb2.PrefillResponse:
        """Move the request to another decode group: prefill prompt + generated tokens again, reserve
        there for the rest of the budget; returns the prefill's answer (the next token)."""
        self.migrations += 1
        self._release_reservation()  # the dead group's: harmless if it is gone
        if not self.balancer.repick(self.decision, "decode"):
            raise Unavailable(f"request {self.label}: {'; '.join(self.failures)}; no other decode group to move to")
        self.failures[-1] += f"; moved to {self.decision.decode.address}"
        log.info("request_id=%s migrating to decode group %s", self.id, self.decision.decode.address)
        self.balancer.charge(self.decision)
        self.prefilling = True
        return self._reserve_and_prefill(ids + self.generated, self.params.max_tokens - len(self.generated))
