"""KV handoff between parallel layouts: (TP, CP) prefill ranks -> (TP', KVP') decode ranks.

The plan is checked exhaustively over small layouts; the handoffs move real KVCache shards of one
single-process KV (random float32) over TCP and over NIXL (UCX loopback) and check the
reassembled destinations bit-identical to it.
"""

import itertools
import random

import pytest

from ringserve.engine.tp import kv_heads
from ringserve.kv_transfer.plan import Want, balanced_shares, check_wants, plan_layout, plan_moves


def decode_wants(total: int, kvp: int, tp: int, num_kv_heads: int) -> list[Want]:
    """A (TP', KVP') decode layout's wants, KVP rank major (what a decode leader's targets say)."""
    shares = balanced_shares(total, kvp)
    return [
        Want(sum(shares[:r]), shares[r], kv_heads(t, tp, num_kv_heads)) for r in range(kvp) for t in range(tp)
    ]


def _tp_sizes(num_kv_heads: int) -> list[int]:
    return [t for t in (1, 2, 3, 4, 6, 8) if (t <= num_kv_heads and num_kv_heads % t == 0) or t % num_kv_heads == 0]


LAYOUTS = [
    (h, tp, cp, tp2, kvp)
    for h in (1, 2, 3, 4, 8)
    for tp, tp2 in itertools.product(_tp_sizes(h), repeat=2)
    for cp, kvp in itertools.product([1, 2, 3], repeat=2)
]


def test_every_token_head_of_every_destination_comes_from_exactly_one_source():
    """Over every small layout (KV heads 1-8, TP sizes 1-8 each side, CP and KVP 1-3)."""
    assert len(LAYOUTS) > 900
    for layout in LAYOUTS:
        _check_plan(*layout)


def _check_plan(h: int, tp: int, cp: int, tp2: int, kvp: int) -> None:
    rng = random.Random(hash((h, tp, cp, tp2, kvp)))
    counts = [rng.randint(0, 13) for _ in range(cp)]
    total = sum(counts)
    wants = decode_wants(total, kvp, tp2, h)
    moves = plan_layout(counts, tp, h, wants)
    starts = [sum(counts[:c]) for c in range(cp)]
    got: dict[tuple[int, int, int], tuple[int, int]] = {}  # (destination, row, local head) -> (token, global head)
    sent = [0] * tp  # per source TP rank, cells sent (for the replica balance)
    for m in moves:
        src_heads = kv_heads(m.src_tp, tp, h)
        assert m.count > 0 and len(m.src_heads) == len(m.dst_heads) > 0
        assert 0 <= m.src_start and m.src_start + m.count <= counts[m.src_rank]
        assert m.src_heads.start >= 0 and m.src_heads.stop <= len(src_heads)
        assert 0 <= m.dst_start and m.dst_start + m.count <= wants[m.dst].count
        assert m.dst_heads.start >= 0 and m.dst_heads.stop <= len(wants[m.dst].heads)
        for i in range(m.count):
            for sh, dh in zip(m.src_heads, m.dst_heads):
                key = (m.dst, m.dst_start + i, dh)
                assert key not in got, f"{key} written twice"
                token, head = starts[m.src_rank] + m.src_start + i, src_heads[sh]
                got[key] = (token, head)
                assert (token, head) == (wants[m.dst].first + m.dst_start + i, wants[m.dst].heads[dh])
        sent[m.src_tp] += m.count * len(m.src_heads)
    wanted = {(d, r, j) for d, w in enumerate(wants) for r in range(w.count) for j in range(len(w.heads))}
    assert set(got) == wanted
    if tp > h:  # replicas of one head share its load evenly (to a row per move)
        moves_per_tp = [sum(1 for m in moves if m.src_tp == t) for t in range(tp)]
        for head in range(h):
            replicas = [t for t in range(tp) if head in kv_heads(t, tp, h)]
            loads = [sent[t] for t in replicas]
            assert max(loads) - min(loads) <= max(moves_per_tp[t] for t in replicas)


def test_one_tp_rank_each_side_plans_exactly_the_token_moves():
    for counts, shares in (([5, 0, 7], [4, 4, 4]), ([9], [3, 3, 3]), ([2, 2, 2, 2], [8])):
        moves = plan_layout(counts, 1, 4, [Want(sum(shares[:d]), n, range(4)) for d, n in enumerate(shares)])
        tokens = [(m.src_rank, m.src_start, m.dst, m.dst_start, m.count) for m in moves]
        expected = [(m.src_rank, m.src_start, m.dst_rank, m.dst_start, m.count) for m in plan_moves(counts, shares)]
        assert sorted(tokens) == sorted(expected)
        assert all(m.src_heads == m.dst_heads == range(4) and m.src_tp == 0 for m in moves)


def test_replicated_heads_split_rows_over_their_replicas():
    # TP 4 with 2 KV heads -> TP 1: head 0 lives on TP ranks 0 and 1, head 1 on 2 and 3.
    moves = plan_layout([10], 4, 2, [Want(0, 10, range(2))])
    by_tp = {m.src_tp: (m.src_start, m.count, m.dst_heads) for m in moves}
    assert by_tp == {0: (0, 5, range(0, 1)), 1: (5, 5, range(0, 1)), 2: (0, 5, range(1, 2)), 3: (5, 5, range(1, 2))}


def test_wants_that_do_not_cover_every_token_head_are_refused():
    check_wants(10, 2, decode_wants(10, 2, 4, 2))  # replicated decode heads: each covered twice, evenly
    bad = [
        ([Want(0, 10, range(1))], "KV head 1"),  # head 1 wanted by nobody
        ([Want(0, 6, range(2)), Want(5, 5, range(2))], "evenly"),  # token 5 twice
        ([Want(0, 4, range(2)), Want(5, 5, range(2))], "evenly"),  # token 4 never
        ([Want(0, 11, range(2))], "outside the prompt"),
        ([Want(0, 10, range(1, 3))], "inside the model"),
    ]
    for wants, match in bad:
        with pytest.raises(ValueError, match=match):
            check_wants(10, 2, wants)
