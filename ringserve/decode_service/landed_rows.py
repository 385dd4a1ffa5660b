"""Which prompt rows of one rank's share have landed: each row counts once, however often it comes."""

from __future__ import annotations


class LandedRows:
    """A set of rows kept as sorted, disjoint [start, end) runs (a push is a few runs per rank)."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, int]] = []

    def add(self, start: int, end: int) -> int:
        """Record rows [start, end); returns how many of them had not landed before (0: a repeat)."""
        new = end - start - sum(max(0, min(b, end) - max(a, start)) for a, b in self.runs)
        kept = []
        for a, b in self.runs:
            if b < start or a > end:
                kept.append((a, b))
            else:  # overlapping or touching: merge
                start, end = min(a, start), max(b, end)
        self.runs = sorted([*kept, (start, end)])
        return new
