"""Transfer plans: which tokens and KV heads of which prefill rank go to which decode rank.

KV shards are sets (keys are cached after RoPE and decode attends to every cached token), so any
prefill layout maps to any decode layout: lay the prefill CP ranks' tokens end to end, lay the
decode ranks' shares over the same order, and cut where either changes hands. With tensor
parallelism a rank also holds only some KV heads (``engine/tp.py``): a destination wants a head
range of its token share, and each (token, head) it wants comes from exactly one source rank.
Where several source TP ranks hold the same head (replicated: fewer KV heads than TP ranks), the
rows are split evenly over those replicas, so none carries more than its part. Destinations
that hold the same head (replicated on the decode side) each get their own copy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ringserve.engine.tp import kv_heads


@dataclass(frozen=True)
class Move:
    """``count`` tokens from ``src_rank``'s local KV at ``src_start`` to ``dst_rank`` at ``dst_start``."""

    src_rank: int
    src_start: int
    dst_rank: int
    dst_start: int
    count: int


@dataclass(frozen=True)
class Want:
    """What one destination rank takes: rows [first, first + count) of the plan's token order (its
    first prompt position and share), of the global KV heads ``heads``."""

    first: int
    count: int
    heads: range


@dataclass(frozen=True)
class HeadMove:
    """``count`` rows of the heads ``src_heads`` (the source rank's local head indices) from CP rank
    ``src_rank``, TP rank ``src_tp``, local rows from ``src_start``, to destination ``dst`` (an
    index into the wants) rows from ``dst_start`` of its share, heads ``dst_heads`` (its local
    indices). Both head ranges have the same length."""

    src_rank: int
    src_tp: int
    src_start: int
    dst: int
    dst_start: int
    count: int
    src_heads: range
    dst_heads: range


def balanced_shares(total: int, ranks: int) -> list[int]:
    """Token counts for ``ranks`` decode ranks that differ by at most one."""
    return [total // ranks + (1 if r < total % ranks else 0) for r in range(ranks)]


def _head_holders(tp: int, num_kv_heads: int) -> list[tuple[range, list[int]]]:
    """Each distinct head range of ``tp`` ranks with the TP ranks holding it (several: replicated)."""
    holders: dict[range, list[int]] = {}
    for t in range(tp):
        holders.setdefault(kv_heads(t, tp, num_kv_heads), []).append(t)
    return list(holders.items())


def _overlap(a: range, b: range) -> range:
    return range(max(a.start, b.start), min(a.stop, b.stop))


def _depths(spans: list[tuple[int, int]], total: int) -> set[int]:
    """How many of ``spans`` cover each point of [0, total), as the set of depths met."""
    deltas = Counter({0: 0})
    for a, b in spans:
        deltas[a] += 1
        deltas[b] -= 1
    depth, depths = 0, set()
    for x in sorted(deltas):
        if x >= total:
            break
        depth += deltas[x]
        depths.add(depth)
    return depths


def check_wants(total: int, num_kv_heads: int, wants: Sequence[Want]) -> None:
    """Raise ValueError unless every want lies in [0, total) x [0, num_kv_heads) and, for each head,
    the wants holding it cover every token equally often (once per decode replica of the head)."""
    for w in wants:
        if w.count < 0 or w.first < 0 or w.first + w.count > total:
            raise ValueError(f"a decode share [{w.first}, {w.first + w.count}) is outside the prompt's {total} tokens")
        if not w.heads or w.heads.start < 0 or w.heads.stop > num_kv_heads or w.heads.step != 1:
            raise ValueError(f"a decode rank's KV heads {w.heads} are not a range inside the model's {num_kv_heads}")
    checked = set()  # heads with the same shares (a TP rank's heads) are checked once
    for h in range(num_kv_heads):
        spans = tuple(sorted((w.first, w.first + w.count) for w in wants if h in w.heads and w.count))
        if spans in checked or not total:
            continue
        checked.add(spans)
        depths = _depths(list(spans), total)
        if min(depths) < 1 or len(depths) > 1:
            raise ValueError(f"the decode shares of KV head {h} do not cover the prompt's {total} tokens evenly")


def plan_layout(src_counts: Sequence[int], src_tp: int, num_kv_heads: int, wants: Sequence[Want]) -> list[HeadMove]:
    """Moves that bring every (token, head) each destination wants from exactly one source.

    Sources are CP rank ``c`` (holding ``src_counts[c]`` tokens, the plan's order laying them end
    to end) times TP rank ``t`` of ``src_tp`` (holding ``kv_heads(t, src_tp, num_kv_heads)``).
    Moves come in destination order; a piece of a head that several source TP ranks hold goes out
    in equal parts, one from each replica, the replicas taken in a rotation that starts at the
    destination's index (so remainders do not all land on one replica).
    """
    total = sum(src_counts)
    check_wants(total, num_kv_heads, wants)
    starts = [sum(src_counts[:c]) for c in range(len(src_counts))]
    holders = _head_holders(src_tp, num_kv_heads)
    moves = []
    for d, w in enumerate(wants):
        for c, (start, n) in enumerate(zip(starts, src_counts)):
            rows = _overlap(range(w.first, w.first + w.count), range(start, start + n))
            if not rows:
                continue
            for held, tps in holders:
                heads = _overlap(held, w.heads)
                if not heads:
                    continue
                src_heads = range(heads.start - held.start, heads.stop - held.start)
                dst_heads = range(heads.start - w.heads.start, heads.stop - w.heads.start)
                a = rows.start
                for i, part in enumerate(balanced_shares(len(rows), len(tps))):
                    if part:
                        t = tps[(i + d) % len(tps)]
                        moves.append(HeadMove(c, t, a - start, d, a - w.first, part, src_heads, dst_heads))
                    a += part
    return moves


def plan_moves(src_counts: list[int], dst_counts: list[int]) -> list[Move]:
    """Moves that carry every source token to exactly one destination slot (every rank holding
    every KV head: TP 1 on both sides)."""
    if sum(src_counts) != sum(dst_counts):
        raise ValueError(f"sources hold {sum(src_counts)} tokens, destinations {sum(dst_counts)}")
    wants = [Want(sum(dst_counts[:d]), n, range(1)) for d, n in enumerate(dst_counts)]
    moves = plan_layout(src_counts, 1, 1, wants)
    return sorted((Move(m.src_rank, m.src_start, m.dst, m.dst_start, m.count) for m in moves), key=_by_source)


def _by_source(m: Move) -> tuple[int, int]:
    return m.src_rank, m.src_start
