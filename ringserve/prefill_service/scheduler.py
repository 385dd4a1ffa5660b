"""What a prefill group runs in each pass: chunked prefill, least-remaining-slack first (Medha).

One multi-hundred-thousand-token prefill would hold the group for tens of seconds while short
requests queue behind it. So prompts are split into chunks and every pass is a preemption point
(the KV of earlier chunks stays on the ranks): each pass the leader picks, from all active
requests, a few chunks that together take about ``target_pass_s`` (Agrawal et al., "Medha",
arXiv 2409.17264).

Who goes first: ``lrs`` orders by slack, ``deadline - now - predicted time of the rest``. Short
requests, whose rest is small, pass ahead of long ones that still have time to spare, and a long
request near its deadline passes ahead of everyone. Waiting lowers slack 1:1 with time, so a
waiting request moves up until it goes first or its slack turns negative. Requests already late
(slack < 0), most late first, run ahead of the on-time ones only as far as the smallest on-time
slack pays for their predicted time; the rest queue behind all on-time work. So a burst of long
prompts that misses its deadlines does not drag every short request behind it past theirs too
(with plain slack order it does: EDF's domino effect), and a short request made late by one long
chunk still goes next instead of waiting for the whole long prompt.
``fcfs`` (arrival order, for comparison) runs a long prompt to the end before anyone behind it.

How big a chunk: a ``CostModel`` fitted to measured pass times predicts a pass's time, and each
chunk is the largest one that keeps the pass under its time limit. Chunks shrink as a prompt's
context grows (attention work per token grows with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ringserve.errors import DeadlineExceeded, InvalidArgument
from ringserve.prefill_service.cost_model import CostModel

POLICIES = ("lrs", "fcfs")


@dataclass
class QueuedPrompt:
    """One prompt being prefilled; ``num_done`` advances only in ``Scheduler.pass_done``."""

    request_id: str
    num_tokens: int
    num_done: int
    arrival: float
    deadline: float
    started: bool = False
    passes: int = 0
    waits_for_memory: bool = False  # its last start was refused: its KV did not fit next to the others

    @property
    def remaining(self) -> int:
        """Prompt tokens still to compute."""
        return self.num_tokens - self.num_done


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[start, start + num_tokens)`` of one request's prompt, computed in one pass."""

    request_id: str
    start: int
    num_tokens: int
    first: bool
    last: bool


@dataclass(frozen=True)
class SchedulerConfig:
    """How passes are built; see ``Scheduler.next_pass``."""

    policy: str = "lrs"
    target_pass_s: float = 0.25
    max_overhead: float = 0.05
    chunk_unit: int = 128
    max_pass_tokens: int = 65536
    max_pass_requests: int = 16
    ttft_min_s: float = 1.0
    ttft_factor: float = 3.0
    reject_late: bool = False


def _validate(cfg: SchedulerConfig) -> None:
    if cfg.policy not in POLICIES:
        raise InvalidArgument(f"unknown scheduling policy {cfg.policy!r}; choose one of {POLICIES}")
    for name in ("target_pass_s", "ttft_min_s", "ttft_factor"):
        if not getattr(cfg, name) > 0:
            raise InvalidArgument(f"scheduler {name} must be > 0, got {getattr(cfg, name)}")
    if not 0 < cfg.max_overhead < 1:
        raise InvalidArgument(f"scheduler max_overhead is a share of a pass, in (0, 1); got {cfg.max_overhead}")
    for name in ("chunk_unit", "max_pass_tokens", "max_pass_requests"):
        if getattr(cfg, name) < 1:
            raise InvalidArgument(f"scheduler {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_pass_tokens < cfg.chunk_unit:
        raise InvalidArgument(
            f"scheduler max_pass_tokens ({cfg.max_pass_tokens}) is below chunk_unit ({cfg.chunk_unit}): "
            "no chunk of a long prompt could ever run"
        )


class Scheduler:
    """Queue of prefill requests and the planner of the group's passes (runs in the group leader).

    Counters: ``finished``, ``late`` (finished after their deadline), ``rejected`` (refused by
    ``add`` or removed by ``expire``), ``passes``.
    """

    def __init__(self, cfg: SchedulerConfig, cost: CostModel):
        _validate(cfg)
        self.cfg = cfg
        self.cost = cost
        self._requests: dict[str, QueuedPrompt] = {}
        self.finished = 0
        self.late = 0
        self.rejected = 0
        self.passes = 0

    @property
    def requests(self) -> list[QueuedPrompt]:
        """Active requests (queued or started), in arrival order."""
        return sorted(self._requests.values(), key=lambda r: r.arrival)

    def slack(self, request: QueuedPrompt, now: float) -> float:
        """Seconds to spare: deadline - now - predicted time of the rest of the prompt."""
        return request.deadline - now - self.cost.remaining_s(request.num_tokens, request.num_done)

    def add(
        self, request_id: str, num_tokens: int, num_done: int, now: float, ttft_s: float | None = None
    ) -> QueuedPrompt:
        """Queue a request; ``num_done`` is its cached prefix, ``now`` its arrival.

        ``ttft_s`` is its own TTFT budget; None gives ``max(ttft_min_s, ttft_factor * predicted
        time alone)``. With ``reject_late``, raises DeadlineExceeded if even alone it cannot
        finish by its deadline.
        """
        if request_id in self._requests:
            raise InvalidArgument(f"request {request_id!r} is already queued; request ids must be unique")
        if num_tokens < 1:
            raise InvalidArgument(f"request {request_id!r} has {num_tokens} prompt tokens; a prompt needs at least 1")
        if not 0 <= num_done < num_tokens:
            raise InvalidArgument(
                f"request {request_id!r}: cached prefix {num_done} must be in [0, {num_tokens}) "
                "(at least one prompt token must be computed to produce the first token)"
            )
        if ttft_s is not None and not ttft_s > 0:
            raise InvalidArgument(f"request {request_id!r}: TTFT budget must be > 0 seconds, got {ttft_s}")
        alone = self.cost.remaining_s(num_tokens, num_done)
        if ttft_s is None:
            ttft_s = max(self.cfg.ttft_min_s, self.cfg.ttft_factor * alone)
        request = QueuedPrompt(request_id, num_tokens, num_done, arrival=now, deadline=now + ttft_s)
        if self.cfg.reject_late and alone > ttft_s:
            self.rejected += 1
            raise DeadlineExceeded(
                f"request {request_id!r} needs about {alone:.2f} s of prefill ({num_tokens - num_done} tokens) "
                f"but its TTFT budget is {ttft_s:.2f} s; shorten the prompt or allow more time"
            )
        self._requests[request_id] = request
        return request

    def cancel(self, request_id: str) -> QueuedPrompt | None:
        """Remove a request wherever it is (queued or started); None if unknown."""
        return self._requests.pop(request_id, None)

    def expire(self, now: float) -> list[QueuedPrompt]:
        """With ``reject_late``: remove and return requests not yet started whose slack is < 0.

        Started ones are kept: their KV is already computed in part, so finishing them late costs
        less than what was spent. Without ``reject_late`` nothing expires.
        """
        if not self.cfg.reject_late:
            return []
        gone = [r for r in self._requests.values() if not r.started and self.slack(r, now) < 0]
        for r in gone:
            del self._requests[r.request_id]
        self.rejected += len(gone)
        return gone

    def next_pass(self, now: float, try_start: Callable[[QueuedPrompt], bool] = lambda r: True) -> list[Chunk]:
        """Plan the next pass; [] when nothing can run.

        1. Order: ``lrs`` by slack ascending (ties: arrival), except for late requests (slack < 0),
           see ``_lrs_order``; ``fcfs`` by arrival.
        2. Walk that order. Each request gets the largest chunk c that is its whole rest or a
           multiple of ``chunk_unit`` below it, such that the pass's predicted time stays within
           its limit and its new tokens within ``max_pass_tokens``. A request for which no chunk
           fits is skipped; a later, smaller one may still fit.
        3. The limit is ``target_pass_s``, but the pass's first chunk is at least the efficient
           chunk: the smallest one whose pass spends at most ``max_overhead`` of its time on the
           fixed and per-sequence costs (or the whole rest, if smaller). So every pass makes
           progress and never runs tiny chunks; it may then take longer than the target.
        4. ``lrs`` only: a chunk joins a pass only if the pass's predicted time stays within the
           smallest positive slack of the requests already in it, so filler cannot make the urgent
           work late (requests already late have no slack left to protect).
        5. A request not yet started is started first, and only if ``try_start(request)`` returns
           True (the group reserves its KV memory there, and may lower the request's ``num_done``
           to what its prefix cache really holds now); its chunk is sized after that. A started
           request that gets no chunk in this pass keeps its memory and runs in a later one.
        6. At most ``max_pass_requests`` chunks per pass.
        7. No starvation by memory: once a request whose start was refused (its KV did not fit)
           is past its deadline, requests that arrived after it may not start before it does;
           requests in flight go on, free their memory as they finish, and it starts.

        ``num_done`` does not move here; ``pass_done`` advances it once the pass has run.
        """
        cfg = self.cfg
        if cfg.policy == "lrs":
            slack = {r.request_id: self.slack(r, now) for r in self._requests.values()}
            order = self._lrs_order(slack)
        else:
            order = self.requests
        chunks: list[Chunk] = []
        work: list[tuple[int, int]] = []
        limit = cfg.target_pass_s
        starving = [r.arrival for r in self._requests.values() if r.waits_for_memory and now > r.deadline]
        first_starving = min(starving, default=math.inf)
        for request in order:
            if len(chunks) >= cfg.max_pass_requests:
                break
            room = cfg.max_pass_tokens - sum(c for c, _ in work)
            if chunks and (room < 1 or self.cost.predict([*work, (1, 0)]) > limit):
                break  # not even one more token fits: the rest of the walk would find nothing
            if not request.started:
                if request.arrival > first_starving:
                    continue  # its memory is held back for an older request that could not start
                if not try_start(request):
                    request.waits_for_memory = True
                    continue
                request.started, request.waits_for_memory = True, False
            first_limit = limit if chunks else max(limit, self._efficient_time(request, room))
            c = self._largest_chunk(request, work, first_limit, room)
            if c == 0:
                continue  # started: it runs in a later pass, its memory already held
            chunks.append(
                Chunk(request.request_id, request.num_done, c, first=request.passes == 0, last=c == request.remaining)
            )
            work.append((c, request.num_done))
            if cfg.policy == "lrs" and slack[request.request_id] > 0:
                limit = min(limit, slack[request.request_id])
        return chunks

    def _lrs_order(self, slack: dict[str, float]) -> list[QueuedPrompt]:
        """Requests that can still meet their deadline, least slack first; late ones go first only
        as far as the on-time ones' slack pays for them.

        Ordered by slack alone, one late long prompt (most negative slack) would run first and make
        every short request behind it late too. Put after all on-time work, a short request that
        turned late while one long chunk ran would wait for the whole long prompt. So late requests
        (most late first) run ahead while their predicted times add up to no more than the smallest
        slack among on-time requests (nobody on time is made late by them); the rest come last.
        """
        by_slack = sorted(self._requests.values(), key=lambda r: (slack[r.request_id], r.arrival))
        on_time = [r for r in by_slack if slack[r.request_id] >= 0]
        late = [r for r in by_slack if slack[r.request_id] < 0]
        budget = slack[on_time[0].request_id] if on_time else float("inf")
        ahead, behind = [], []
        for r in late:
            cost = self.cost.remaining_s(r.num_tokens, r.num_done)
            if cost <= budget:
                ahead.append(r)
                budget -= cost
            else:
                behind.append(r)
        return ahead + on_time + behind

    def pass_done(self, chunks: Sequence[Chunk], seconds: float, now: float) -> list[QueuedPrompt]:
        """Record a pass that ran in ``seconds`` (ending at ``now``); returns the requests it finished.

        Chunks of requests cancelled meanwhile are ignored, but the pass still calibrates the cost model.
        """
        for chunk in chunks:
            request = self._requests.get(chunk.request_id)
            if request is not None and chunk.start != request.num_done:
                raise InvalidArgument(
                    f"chunk of {chunk.request_id!r} starts at token {chunk.start} but {request.num_done} are done; "
                    "pass_done must be called exactly once per pass from next_pass"
                )
        self.cost.observe([(c.num_tokens, c.start) for c in chunks], seconds)
        self.passes += 1
        done = []
        for chunk in chunks:
            request = self._requests.get(chunk.request_id)
            if request is None:
                continue
            request.num_done += chunk.num_tokens
            request.passes += 1
            if request.remaining == 0:
                del self._requests[request.request_id]
                self.finished += 1
                self.late += now > request.deadline
                done.append(request)
        return done

    def _largest_chunk(self, request: QueuedPrompt, work: list[tuple[int, int]], limit: float, room: int) -> int:
        """Largest allowed chunk of ``request`` that keeps the pass within ``limit`` and ``room``; 0 if none."""
        d, rest, unit = request.num_done, request.remaining, self.cfg.chunk_unit

        def fits(c: int) -> bool:
            return c <= room and self.cost.predict([*work, (c, d)]) <= limit

        if fits(rest):
            return rest
        # Predicted time grows with c, so binary-search the number of units.
        lo, hi = 0, min(rest - 1, room) // unit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid * unit):
                lo = mid
            else:
                hi = mid - 1
        return lo * unit

    def _efficient_time(self, request: QueuedPrompt, room: int) -> float:
        """Predicted time of a pass holding only ``request``'s efficient chunk (see ``next_pass``, rule 3)."""
        fixed, per_sequence, _, _ = self.cost.coefficients
        overhead = fixed + per_sequence
        d, rest, unit = request.num_done, request.remaining, self.cfg.chunk_unit
        candidates = min(rest - 1, room) // unit  # allowed multiples of unit below the whole rest

        def efficient(c: int) -> bool:
            return overhead <= self.cfg.max_overhead * self.cost.predict([(c, d)])

        if candidates == 0 or not efficient(candidates * unit):
            # No multiple below the rest is efficient: the whole rest in one go, if the room allows.
            return self.cost.predict([(rest if rest <= room else candidates * unit, d)])
        lo, hi = 1, candidates  # binary-search the smallest efficient multiple
        while lo < hi:
            mid = (lo + hi) // 2
            if efficient(mid * unit):
                hi = mid
            else:
                lo = mid + 1
        return self.cost.predict([(lo * unit, d)])
