"""Which prompt rows of one rank's share have landed: each piece counts once, however often it comes.

With tensor parallelism a piece may carry only some of a row's KV heads (the prefill side's TP
ranks each send theirs), so rows are tracked per local KV head: a row is complete once every
head of it has landed.
"""

from __future__ import annotations

from dataclasses import dataclass


def _add_run(runs: list[tuple[int, int]], start: int, end: int) -> tuple[list[tuple[int, int]], int]:
    """``runs`` (sorted, disjoint [start, end)) with [start, end) added, and how many of its rows are new."""
    new = end - start - sum(max(0, min(b, end) - max(a, start)) for a, b in runs)
    kept = []
    for a, b in runs:
        if b < start or a > end:
            kept.append((a, b))
        else:  # overlapping or touching: merge
            start, end = min(a, start), max(b, end)
    return sorted([*kept, (start, end)]), new


def _common(start: int, end: int, per_head: list[list[tuple[int, int]]]) -> int:
    """Rows of [start, end) that every head's runs hold."""
    spans = [(start, end)]
    for runs in per_head:
        spans = [(max(a, c), min(b, d)) for a, b in spans for c, d in runs if max(a, c) < min(b, d)]
    return sum(b - a for a, b in spans)


@dataclass(frozen=True)
class Added:
    """What one landed piece added: its (row, head) cells not seen before, of ``cells``, and the
    rows it completed (every head landed)."""

    new_cells: int
    cells: int
    completed: int

    @property
    def repeated(self) -> bool:
        """Some of the piece had landed before (a retried or overlapping push)."""
        return self.new_cells < self.cells


class LandedRows:
    """Per local KV head, the rows landed as sorted, disjoint [start, end) runs (a push is a few
    runs per rank and head)."""

    def __init__(self, kv_heads: int = 1) -> None:
        self.kv_heads = kv_heads
        self.heads: list[list[tuple[int, int]]] = [[] for _ in range(kv_heads)]

    def holds(self, heads: range | None) -> bool:
        """Whether ``heads`` (local indices; None: whole rows) are heads of this rank: a piece of
        others is stray."""
        return heads is None or (bool(heads) and heads.start >= 0 and heads.stop <= self.kv_heads)

    def add(self, start: int, end: int, heads: range | None = None) -> Added:
        """Record rows [start, end) of local heads ``heads`` (None: whole rows). Raises ValueError
        for heads this rank does not hold (check ``holds`` first: a stray piece is counted, not added)."""
        if not self.holds(heads):
            raise ValueError(f"KV heads {heads} are outside this rank's {self.kv_heads}")
        heads = range(self.kv_heads) if heads is None else heads
        before = _common(start, end, self.heads)
        new = 0
        for h in heads:
            self.heads[h], fresh = _add_run(self.heads[h], start, end)
            new += fresh
        return Added(new, (end - start) * len(heads), _common(start, end, self.heads) - before)
