"""Transfer plans between layouts, and the TCP data path between real sockets."""

import itertools
import random

import pytest
import torch

from ringserve.errors import InvalidArgument, Unavailable
from ringserve.kv_transfer.plan import balanced_shares, plan_moves
from ringserve.kv_transfer.tcp import KVReceiver, send_kv


@pytest.mark.parametrize("n,k", list(itertools.product([1, 2, 3, 4], [1, 2, 3, 4])))
def test_plan_moves_every_token_exactly_once(n, k):
    rng = random.Random(n * 10 + k)
    src = [rng.randint(0, 50) for _ in range(n)]
    dst = balanced_shares(sum(src), k)
    assert max(dst) - min(dst) <= 1
    moves = plan_moves(src, dst)
    seen_src = sorted((m.src_rank, m.src_start + i) for m in moves for i in range(m.count))
    seen_dst = sorted((m.dst_rank, m.dst_start + i) for m in moves for i in range(m.count))
    assert seen_src == [(r, i) for r in range(n) for i in range(src[r])]
    assert seen_dst == [(r, i) for r in range(k) for i in range(dst[r])]


def test_plan_rejects_mismatched_totals():
    with pytest.raises(ValueError):
        plan_moves([3, 4], [8])


def test_tcp_transfer_is_bit_exact_and_reports_refusals():
    landed = {}

    def sink(request_id, first, kv):
        if request_id == "refuse":
            raise InvalidArgument("rows out of range")
        landed[request_id] = (first, kv.clone())

    receiver = KVReceiver(sink)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            kv = torch.randn(3, 2, 37, 2, 8).to(dtype)
            sent = send_kv(receiver.address, f"r-{dtype}", 5, kv)
            assert sent == kv.numel() * kv.element_size()
            first, got = landed[f"r-{dtype}"]
            assert first == 5 and got.dtype == dtype and torch.equal(got, kv)
        with pytest.raises(InvalidArgument, match="rows out of range"):
            send_kv(receiver.address, "refuse", 0, torch.zeros(1, 2, 1, 1, 1))
    finally:
        receiver.close()


def test_tcp_transfer_to_a_dead_receiver_is_unavailable():
    receiver = KVReceiver(lambda *a: None)
    address = receiver.address
    receiver.close()
    with pytest.raises(Unavailable, match="failed"):
        send_kv(address, "r", 0, torch.zeros(1, 2, 1, 1, 1), timeout_s=2)
