"""Transfer plans between layouts, and the TCP data path between real sockets."""

import itertools
import random
import socket

import pytest
import torch

from bench.fragment import mixed_load_table
from ringserve.engine.config import ModelConfig
from ringserve.engine.kv_cache import KVCache, as_runs
from ringserve.errors import InvalidArgument, PermissionDenied, Unavailable
from ringserve.kv_transfer.plan import balanced_shares, plan_moves
from ringserve.kv_transfer.secret import tag
from ringserve.kv_transfer.tcp import KVReceiver, _recv_msg, _send_msg, _signed, row_slices, send_kv, store_rows
from ringserve.metrics import KV_DROPPED


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


def test_tcp_transfer_is_bit_exact_in_bounded_slices_and_reports_refusals():
    landed = {}
    sizes = []

    def admit(frame):
        if frame.request_id == "refuse-header":
            raise InvalidArgument("no such reservation")
        sizes.append(frame.nbytes)

    def sink(frame, kv):
        if frame.request_id == "refuse":
            raise InvalidArgument("rows out of range")
        landed.setdefault((frame.request_id, frame.epoch, frame.transfer_id), []).append(
            (frame.first_position, kv.clone())
        )

    receiver = KVReceiver(admit, sink)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            kv = torch.randn(3, 2, 37, 2, 8).to(dtype)
            row_bytes = kv[:, :, :1].numel() * kv.element_size()
            slices = [(5 + a, kv[:, :, a:b]) for a, b in row_slices(37, row_bytes, limit=10 * row_bytes)]
            sent = send_kv(receiver.address, f"r-{dtype}", 3, "0.0", slices)
            assert sent == kv.numel() * kv.element_size()
            got = landed[(f"r-{dtype}", 3, "0.0")]
            assert [first for first, _ in got] == [5, 15, 25, 35]  # four frames of at most 10 rows
            assert torch.equal(torch.cat([rows for _, rows in got], dim=2), kv) and got[0][1].dtype == dtype
        assert max(sizes) <= 10 * 3 * 2 * 2 * 8 * 4
        with pytest.raises(InvalidArgument, match="rows out of range"):
            send_kv(receiver.address, "refuse", 1, "t", [(0, torch.zeros(1, 2, 1, 1, 1))])
        with pytest.raises(InvalidArgument, match="no such reservation"):
            send_kv(receiver.address, "refuse-header", 1, "t", [(0, torch.zeros(1, 2, 1, 1, 1))])
        assert receiver.dropped["refused"] == 2
    finally:
        receiver.close()


def test_tcp_transfer_to_a_dead_receiver_is_unavailable():
    receiver = KVReceiver(lambda frame: None, lambda frame, kv: None)
    address = receiver.address
    receiver.close()
    with pytest.raises(Unavailable, match="failed"):
        send_kv(address, "r", 0, "t", [(0, torch.zeros(1, 2, 1, 1, 1))], timeout_s=2)


def test_a_wildcard_receiver_advertises_a_reachable_name():
    """Issue 16 (13): with --host 0.0.0.0 the receiver advertised 0.0.0.0, which no peer can reach."""
    receiver = KVReceiver(lambda frame: None, lambda frame, kv: None, host="0.0.0.0")
    try:
        host = receiver.address.rsplit(":", 1)[0]
        assert host not in ("0.0.0.0", "") and host == socket.getfqdn()
    finally:
        receiver.close()
    receiver = KVReceiver(lambda frame: None, lambda frame, kv: None, host="0.0.0.0", advertise_host="kv.example")
    try:
        assert receiver.address.startswith("kv.example:")
    finally:
        receiver.close()


def test_tcp_frames_without_a_valid_mac_are_dropped_and_counted():
    """With a deployment secret, a frame with no MAC, one under another secret, or a header altered
    after signing is dropped before ``admit`` (nothing reaches the reservation) and counted."""
    key = b"deployment-secret-0123456789"
    admitted = []
    receiver = KVReceiver(lambda frame: admitted.append(frame.request_id), lambda frame, kv: None, frame_key=key)
    kv = torch.zeros(1, 2, 1, 1, 1)
    before = KV_DROPPED.labels("unauthenticated")._value.get()
    try:
        for sender_key in (None, b"another-deployments-secret"):
            with pytest.raises(PermissionDenied, match="without a valid MAC"):
                send_kv(receiver.address, "r", 1, "t", [(0, kv)], key=sender_key)
        with socket.create_connection(receiver.address.rsplit(":", 1)) as sock:  # signed, then altered
            header = {"request_id": "r", "epoch": 1, "transfer_id": "t", "first_position": 0, "count": 1}
            header |= {"shape": [1, 2, 1, 1, 1], "dtype": "float32", "nbytes": 8, "checksum": "0"}
            header["mac"] = tag(key, _signed(header)).hex()
            header["first_position"] = 7
            _send_msg(sock, header)
            assert _recv_msg(sock)["code"] == "PERMISSION_DENIED"
        assert admitted == [] and receiver.dropped["unauthenticated"] == 3
        assert KV_DROPPED.labels("unauthenticated")._value.get() == before + 3
        assert send_kv(receiver.address, "r", 1, "t", [(0, kv)], key=key) == 8 and admitted == ["r"]
    finally:
        receiver.close()


def test_tcp_frames_carry_head_pieces_into_their_heads_only():
    """TP: a frame holds some KV heads of its rows; the receiver checks them against its cache and
    writes only those heads; pieces whose heads, shape or bytes do not fit are refused unread."""
    config = ModelConfig(16, 16, 8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=4)
    cache = KVCache(config, 8, 4)
    cache.k.zero_(), cache.v.zero_()
    table = [5, 2, 7]
    stored = []

    def sink(frame, kv):
        store_rows(cache, cache.slots(table, frame.first_position, frame.first_position + frame.count), kv, frame.heads)
        stored.append(frame.heads)

    receiver = KVReceiver(lambda frame: frame.check_fits(cache), sink)
    try:
        kv = torch.randn(2, 2, 9, 2, 4)
        assert send_kv(receiver.address, "r", 1, "0.0", [(1, kv)], heads=range(1, 3)) == kv.numel() * 4
        assert stored == [range(1, 3)]
        slots = cache.slots(table, 1, 10)
        got = torch.stack([cache.k.flatten(1, 2)[:, slots], cache.v.flatten(1, 2)[:, slots]], dim=1)
        assert torch.equal(got[:, :, :, 1:3], kv) and not got[:, :, :, [0, 3]].any()
        assert send_kv(receiver.address, "r", 1, "0.1", [(0, torch.ones(2, 2, 1, 4, 4))]) == 256  # whole rows
        assert stored[-1] is None and cache.k.flatten(1, 2)[:, cache.slots(table, 0, 1)].eq(1).all()
        for heads, rows, match in (
            (range(3, 5), torch.zeros(2, 2, 1, 2, 4), "outside this rank's 4 KV heads"),
            (range(0, 2), torch.zeros(2, 2, 1, 3, 4), "does not match"),
            (None, torch.zeros(2, 2, 1, 2, 4), "does not match"),
        ):
            with pytest.raises(InvalidArgument, match=match):
                send_kv(receiver.address, "r", 1, "t", [(0, rows)], heads=heads)
        assert receiver.dropped["refused"] == 3 and len(stored) == 2
    finally:
        receiver.close()


def test_tcp_moves_a_request_between_pools_after_a_mixed_load_bit_for_bit():
    """Both pools served a seeded mixed load first; the request's rows, gathered from the blocks
    the allocator gave it there, land in the blocks it got here, in bounded frames."""
    config = ModelConfig(16, 16, 8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=4)
    src, dst = KVCache(config, 400, 4), KVCache(config, 400, 4)
    src.k.normal_(), src.v.normal_()
    dst.k.zero_(), dst.v.zero_()
    src_table, dst_table = mixed_load_table(400, 100, seed=1), mixed_load_table(400, 100, seed=2)
    assert min(len(as_runs(src_table)), len(as_runs(dst_table))) > 1  # fragmented, not a fresh pool

    def rows(cache, table):
        slots = cache.slots(table, 0, 400)
        return torch.stack([cache.k.flatten(1, 2)[:, slots], cache.v.flatten(1, 2)[:, slots]], dim=1)

    def sink(frame, kv):
        store_rows(dst, dst.slots(dst_table, frame.first_position, frame.first_position + frame.count), kv)

    receiver = KVReceiver(lambda frame: frame.check_fits(dst), sink)
    try:
        kv = rows(src, src_table)
        row_bytes = kv[:, :, :1].numel() * kv.element_size()
        slices = [(a, kv[:, :, a:b]) for a, b in row_slices(400, row_bytes, limit=64 * row_bytes)]
        assert send_kv(receiver.address, "r", 1, "0.0", slices) == kv.numel() * kv.element_size()
        assert torch.equal(rows(dst, dst_table), kv)
    finally:
        receiver.close()
