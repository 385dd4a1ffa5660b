"""Scoring: which prefill group and which decode group get a request, from numbers alone.

``cache_aware`` (default) picks the prefill group with the lowest expected time to first token:
the tokens it would still have to prefill (the prompt less the prefix it holds) plus the work
already queued there, at that group's speed. Load always counts, so a hot prefix held by one group
spills to others once that group's queue costs more than recomputing the prefix elsewhere.
``least_loaded`` is the same estimate with no cache hits; ``round_robin`` takes turns. Ties go to
the next group in turn order, so equal groups share the traffic.

Decode has no residency: every policy picks the decode group with the fewest active requests
among those with room for the request's blocks (when none has room, the one with the most).
"""

from __future__ import annotations

from typing import NamedTuple

POLICIES = ("cache_aware", "least_loaded", "round_robin")


class PrefillCandidate(NamedTuple):  # tuples: a decision makes one per group
    cached_tokens: int  # prompt tokens the group is expected to hold already
    queued_tokens: int  # prompt tokens already waiting or running there
    tokens_per_s: float  # the group's prefill speed (> 0)


class DecodeCandidate(NamedTuple):
    active_requests: int
    free_blocks: int
    blocks_needed: int  # the request's KV blocks at this group's block size


def expected_ttft(c: PrefillCandidate, prompt_tokens: int) -> float:
    """Seconds until the group would finish this prompt: its queue, then the uncached tokens."""
    return (c.queued_tokens + prompt_tokens - min(c.cached_tokens, prompt_tokens)) / c.tokens_per_s


def _first_in_turn(scores: list, turn: int) -> int:
    """Index of the lowest score; among equal scores, the first at or after position ``turn``."""
    n = len(scores)
    return min(range(n), key=lambda i: (scores[i], (i - turn) % n))


def pick_prefill(policy: str, candidates: list[PrefillCandidate], prompt_tokens: int, turn: int) -> int:
    """Index of the prefill group that should take a prompt of ``prompt_tokens``."""
    if policy == "round_robin":
        return turn % len(candidates)
    if policy == "least_loaded":
        candidates = [PrefillCandidate(0, c.queued_tokens, c.tokens_per_s) for c in candidates]
    elif policy != "cache_aware":
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    return _first_in_turn([expected_ttft(c, prompt_tokens) for c in candidates], turn)


def pick_decode(candidates: list[DecodeCandidate], turn: int) -> int:
    """Index of the decode group that should hold the request."""
    fits = [c.free_blocks >= c.blocks_needed for c in candidates]
    if not any(fits):  # it will answer RESOURCE_EXHAUSTED unless blocks free up: the best chance
        return max(range(len(candidates)), key=lambda i: candidates[i].free_blocks)
    scores = [(0, c.active_requests) if fit else (1, 0) for c, fit in zip(candidates, fits)]
    return _first_in_turn(scores, turn)
