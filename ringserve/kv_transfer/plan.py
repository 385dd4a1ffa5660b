"""Transfer plans: which tokens of which prefill rank go to which decode rank.

KV shards are sets (keys are cached after RoPE and decode attends to every cached token), so any
prefill layout maps to any decode layout: lay the prefill ranks' tokens end to end, lay the
decode ranks' shares end to end, and cut where either changes hands.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    """``count`` tokens from ``src_rank``'s local KV at ``src_start`` to ``dst_rank`` at ``dst_start``."""

    src_rank: int
    src_start: int
    dst_rank: int
    dst_start: int
    count: int


def balanced_shares(total: int, ranks: int) -> list[int]:
    """Token counts for ``ranks`` decode ranks that differ by at most one."""
    return [total // ranks + (1 if r < total % ranks else 0) for r in range(ranks)]


def plan_moves(src_counts: list[int], dst_counts: list[int]) -> list[Move]:
    """Moves that carry every source token to exactly one destination slot."""
    if sum(src_counts) != sum(dst_counts):
        raise ValueError(f"sources hold {sum(src_counts)} tokens, destinations {sum(dst_counts)}")
    moves = []
    s = d = 0  # current source and destination rank
    s_off = d_off = 0  # offsets inside them
    while s < len(src_counts) and d < len(dst_counts):
        n = min(src_counts[s] - s_off, dst_counts[d] - d_off)
        if n > 0:
            moves.append(Move(s, s_off, d, d_off, n))
        s_off += n
        d_off += n
        if s_off == src_counts[s]:
            s, s_off = s + 1, 0
        if d_off == dst_counts[d]:
            d, d_off = d + 1, 0
    return moves
