"""The KV handoff between tiers is safe: epochs, leases, quarantine, and a receiver that trusts no peer.

A real one-rank decode group in process (its real TCP receiver and NIXL endpoint, UCX over
loopback), raw sockets playing a hostile or broken peer, and a NixlSender playing a prefill rank.
"""

import json
import os
import socket
import struct
import time

import pytest
import torch
from test_decode_worker import NixlSender, drain, prompt_kv_and_first_token, push, send

from ringserve.config import DecodeConfig
from ringserve.decode_service.group import DecodeGroup
from ringserve.decode_service.worker import DecodeWorker
from ringserve.engine.sampling import SamplingParams
from ringserve.errors import FailedPrecondition, InvalidArgument, NotFound
from ringserve.kv_transfer.landing import Landing

os.environ.setdefault("UCX_NET_DEVICES", "lo")

BLOCK = 16


def make_worker(model, tokenizer, transport: str, **cfg) -> DecodeWorker:
    settings = dict(kv_blocks=16, block_size=BLOCK, kv_transfer=transport, kv_idle_timeout_s=1.0)
    group = DecodeGroup(DecodeConfig(**{**settings, **cfg}), model=model)
    return DecodeWorker(group, tokenizer, reservation_ttl_s=60.0, landing_timeout_s=0.5)


@pytest.fixture(scope="module")
def tcp_worker(default_model):
    w = make_worker(*default_model, "tcp")
    yield w
    w.close()
    assert w.blocks_used == 0


def _frame(sock: socket.socket, header: dict) -> dict:
    """Send a frame header (no payload) and read the receiver's answer."""
    data = json.dumps(header).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)
    (n,) = struct.unpack(">I", sock.recv(4))
    return json.loads(sock.recv(n))


def _header(request_id: str, epoch: int, count: int, nbytes: int) -> dict:
    shape = [30, 2, count, 3, 64]  # the default model: 30 layers, 3 KV heads, head dim 64
    return dict(
        request_id=request_id, epoch=epoch, transfer_id="t", first_position=0, count=count, shape=shape,
        dtype="float32", nbytes=nbytes, checksum="0",
    )  # fmt: skip


def test_tcp_receiver_refuses_what_no_reservation_expects(tcp_worker):
    """Defect 10: a frame claiming 2**40 bytes is refused from its header (before: the receiver
    allocated it and died with MemoryError, no answer); rows for an unknown or ended epoch are
    refused; each refusal is counted."""
    w = tcp_worker
    res = w.reserve("a", 10, 5)
    host, port = res.targets[0][1].rsplit(":", 1)
    dropped = w.group.receiver.dropped["refused"]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        reply = _frame(sock, _header("a", res.epoch, 10, 2**40))
        assert not reply["ok"] and reply["code"] == "INVALID_ARGUMENT"
        assert "claims 1099511627776 bytes" in reply["error"]
        assert sock.recv(1) == b""  # and the connection is closed: its payload is never read
    for epoch in (res.epoch + 1, 0):  # not made yet (waits briefly); ended or never made (at once)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            reply = _frame(sock, _header("a", epoch, 10, 10 * 30 * 2 * 3 * 64 * 4))
            assert not reply["ok"] and reply["code"] == "NOT_FOUND" and "no reservation" in reply["error"]
    assert w.group.receiver.dropped["refused"] == dropped + 3
    # The reservation's own epoch and byte count pass, and the rows count once.
    kv = torch.randn(30, 2, 10, 3, 64)
    send(res.targets[0][1], "a", res.epoch, 0, kv)
    assert w.requests["a"].landed == 10
    # Once the reservation ends, its epoch is refused at once.
    assert w.cancel("a")
    with pytest.raises(NotFound, match=f"epoch {res.epoch}"):
        send(res.targets[0][1], "a", res.epoch, 0, kv)
    assert w.blocks_used == 0


def test_tcp_receiver_closes_idle_connections(tcp_worker):
    """Defect 10: an idle peer no longer pins a receiver thread forever."""
    host, port = tcp_worker.group.receiver.address.rsplit(":", 1)
    idle = tcp_worker.group.receiver.dropped["idle"]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # closed by the receiver after kv_idle_timeout_s (1 s)
        assert time.monotonic() - t0 < 25
    assert tcp_worker.group.receiver.dropped["idle"] == idle + 1


def test_repeated_pushes_count_once_and_stale_epochs_not_at_all(tcp_worker, default_model):
    """Defect 7: a push repeated after a failover counts its rows once (before: "only 30 of 20
    arrived"), and KV sent for an earlier reservation under the same id never counts toward a
    later one."""
    model, tokenizer = default_model
    w = tcp_worker
    ids = tokenizer.encode("The capital of France is")
    kv, first = prompt_kv_and_first_token(model, ids)
    old = w.reserve("again", len(ids), 8)
    w.cancel("again")
    res = w.reserve("again", len(ids), 8)
    assert res.epoch > old.epoch
    with pytest.raises(NotFound, match=f"epoch {old.epoch}"):
        push(old, "again", kv)
    assert w.requests["again"].landed == 0
    push(res, "again", kv)
    push(res, "again", kv)  # the same push again, as a prefill retried after a failover sends it
    half = len(ids) // 2
    send(res.targets[0][1], "again", res.epoch, half, kv[:, :, half:], "other-split")  # overlapping rows
    assert w.requests["again"].landed == len(ids)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    from ringserve.engine.engine import Engine

    got = [e.token_id for e in drain(w.start("again", len(ids), first, params))]
    assert got == [e.token_id for e in Engine(model, tokenizer).generate(ids, params)]
    assert w.blocks_used == 0


def test_leases_expire_unless_renewed(default_model):
    """Defect 1 (its second half): a reservation whose prefill is still at work stays while its
    lease is renewed; one nobody renews expires; renewing an ended one or another epoch says so."""
    w = make_worker(*default_model, "tcp")
    w.reservation_ttl_s = 1.0
    try:
        kept, dropped = w.reserve("kept", 20, 5), w.reserve("dropped", 20, 5)
        assert kept.lease_s == 1.0 and not w.renew("kept", kept.epoch + 1)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:  # three lease periods
            assert w.renew("kept", kept.epoch)
            time.sleep(0.3)
        deadline = time.monotonic() + 20
        while "dropped" in w.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "kept" in w.requests and "dropped" not in w.requests
        assert not w.renew("dropped", dropped.epoch)
        assert w.cancel("kept") and w.blocks_used == 0
    finally:
        w.close()


@pytest.fixture(scope="module")
def nixl_pair(default_model):
    pytest.importorskip("nixl._api", reason="NIXL is not installed (pip install nixl)")
    model, tokenizer = default_model
    w = make_worker(model, tokenizer, "nixl")
    assert w.group.transport == "nixl"
    sender = NixlSender(model.config, block_size=BLOCK)
    yield w, sender
    w.close()
    sender.close()
    assert w.blocks_used == 0 and sender.cache.allocator.num_used == 0


def _wait(predicate, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_a_write_after_release_never_reaches_another_requests_blocks(nixl_pair, default_model):
    """Defect 1: a reservation released while its NIXL WRITE is still to come keeps its blocks in
    quarantine (nobody else gets them) until every row has landed, or the prefill side says it
    is done, or the backstop timeout passes; the allocator is back at its baseline after each."""
    model, tokenizer = default_model
    w, sender = nixl_pair
    ids = tokenizer.encode("Once upon a time, in a land far away, there lived")
    kv, _ = prompt_kv_and_first_token(model, ids)
    alloc = w.allocators[0]
    base = alloc.num_used

    # (a) Released before any row landed: quarantined; a WRITE lands afterwards, then it is freed.
    res = w.reserve("late", len(ids), 20)
    held = set(w.requests["late"].tables[0])
    assert w.cancel("late")
    assert w.quarantined_blocks == len(held) and alloc.num_used == base + len(held)
    with w.lock:  # everything else the allocator has: never a quarantined block
        others = alloc.allocate(alloc.num_free)
        assert not held & set(others)
        alloc.free(others)
    push(res, "late", kv, sender)  # the prefill side's WRITE, after the release
    assert _wait(lambda: w.quarantined_blocks == 0), "the landed rows did not end the quarantine"
    assert alloc.num_used == base and w.dropped["stale"] == 0

    # (b) Released, then the prefill side says it writes nothing more for that epoch.
    res = w.reserve("gave-up", len(ids), 20)
    w.cancel("gave-up")
    assert w.quarantined_blocks > 0
    sender.endpoint.notify_done(res.targets[0][4])
    assert _wait(lambda: w.quarantined_blocks == 0), "the done notice did not end the quarantine"
    assert alloc.num_used == base

    # A done notice before the release: nothing to wait for, the blocks are freed at once.
    res = w.reserve("done-first", len(ids), 20)
    sender.endpoint.notify_done(res.targets[0][4])
    assert _wait(lambda: w.requests["done-first"].prefill_done)
    w.cancel("done-first")
    assert w.quarantined_blocks == 0 and alloc.num_used == base

    # (c) No word from the prefill side: freed at the backstop timeout.
    w.quarantine_timeout_s = 0.5
    try:
        w.reserve("silent", len(ids), 20)
        w.cancel("silent")
        assert w.quarantined_blocks > 0
        assert _wait(lambda: w.quarantined_blocks == 0), "the quarantine never timed out"
    finally:
        w.quarantine_timeout_s = 600.0
    assert alloc.num_used == base


def test_a_landing_never_handed_out_needs_no_quarantine(nixl_pair, default_model):
    """The router releases a reservation whose landing no prefill group ever got (the group was
    unreachable, or draining): nothing can WRITE into it, so its blocks are free at once; a
    release without that word still quarantines them."""
    model, tokenizer = default_model
    w, sender = nixl_pair
    ids = tokenizer.encode("The capital of France is")
    kv, _ = prompt_kv_and_first_token(model, ids)
    w.reserve("unused", len(ids), 4)
    assert w.cancel("unused", landing_unused=True)
    assert w.quarantined_blocks == 0 and w.blocks_used == 0
    res = w.reserve("maybe-used", len(ids), 4)
    assert w.cancel("maybe-used")
    assert w.quarantined_blocks > 0
    push(res, "maybe-used", kv, sender)  # the WRITE it allowed lands: the quarantine ends
    assert _wait(lambda: w.quarantined_blocks == 0) and w.blocks_used == 0


def test_stale_nixl_notifications_never_count_toward_a_later_reservation(nixl_pair, default_model):
    """Defect 7 over NIXL: a WRITE for an earlier reservation of the same id is counted as stale,
    and the later reservation cannot start on KV that has not landed."""
    model, tokenizer = default_model
    w, sender = nixl_pair
    ids = tokenizer.encode("1, 2, 3, 4, 5,")
    kv, first = prompt_kv_and_first_token(model, ids)
    old = w.reserve("reused", len(ids), 4)
    push(old, "reused", kv, sender)
    assert _wait(lambda: w.requests["reused"].landed == len(ids))
    w.cancel("reused")  # every row had landed: no quarantine
    assert w.quarantined_blocks == 0
    new = w.reserve("reused", len(ids), 4)
    assert Landing.from_bytes(new.targets[0][4]).epoch == new.epoch > old.epoch
    stale = w.dropped["stale"]
    push(old, "reused", kv, sender)  # a late duplicate of the old push
    assert _wait(lambda: w.dropped["stale"] == stale + 1)
    assert w.requests["reused"].landed == 0
    with pytest.raises(FailedPrecondition, match=f"0 of {len(ids)}"):
        w.start("reused", len(ids), first, SamplingParams(max_tokens=4))
    # A Decode that cannot start ends its reservation (defect 4); its NIXL landing is out, so its
    # blocks wait in quarantine until the WRITE it allowed has landed.
    assert "reused" not in w.requests and w.quarantined_blocks > 0
    push(new, "reused", kv, sender)
    assert _wait(lambda: w.quarantined_blocks == 0)
    assert w.blocks_used == 0


def test_malformed_frame_headers_are_refused():
    from ringserve.kv_transfer.tcp import Frame

    with pytest.raises(InvalidArgument, match="unknown dtype"):
        Frame.parse({**_header("a", 1, 1, 4), "dtype": "__class__"})
    with pytest.raises(InvalidArgument, match="malformed"):
        Frame.parse({"request_id": "a"})


def test_the_prefill_group_tells_nixl_targets_it_is_done(tmp_path, default_model):
    """The prefill leader sends "done" to every NIXL target of a request it ends without pushing
    (here: cancelled between chunks), so a decode reservation released meanwhile leaves quarantine
    at once, with no row landed; a request it pushes lands over NIXL and its KV is exact."""
    pytest.importorskip("nixl._api", reason="NIXL is not installed (pip install nixl)")
    from test_model import tiny_hf
    from test_prefill_group import tokens

    from ringserve.config import PrefillConfig
    from ringserve.engine.model import Llama
    from ringserve.prefill_service.group import PrefillGroup
    from ringserve.prefill_service.protocol import Job
    from ringserve.prefill_service.push import Target

    tiny_hf(8, 2, False, seed=7).save_pretrained(tmp_path)
    model = Llama.load(str(tmp_path), progress=False)
    decode = DecodeWorker(
        DecodeGroup(DecodeConfig(kv_blocks=64, block_size=8, kv_transfer="nixl"), model=model), default_model[1]
    )
    cfg = PrefillConfig(model=str(tmp_path), cp=2, kv_blocks=64, block_size=8, kv_transfer="nixl", port=0)
    prefill = PrefillGroup(PrefillConfig(**{**cfg.__dict__, "max_pass_tokens": 16, "prefix_cache": 0.0}))

    def job(request_id: str, ids: list[int], res) -> Job:
        [(_, address, first, count, landing, *_)] = res.targets
        return Job(request_id, ids, "auto", [Target(address, first, count, landing, res.epoch)], ttft_s=600.0)

    try:
        ids = tokens(200, 80)
        res = decode.reserve("gone", len(ids), 4)
        flight = prefill.submit(job("gone", ids, res))
        while prefill.scheduler.passes == 0:  # its first chunk runs; nothing pushed yet
            time.sleep(0.001)
        decode.cancel("gone")  # the router's Release after, say, a timeout
        assert decode.quarantined_blocks > 0
        prefill.cancel("gone")
        with pytest.raises(Exception, match="cancelled"):
            flight.result(timeout=60)
        assert _wait(lambda: decode.quarantined_blocks == 0), "no done notice reached the decode side"
        assert decode.blocks_used == 0 and decode.dropped["stale"] == 0

        ids = tokens(30, 81)
        res = decode.reserve("kept", len(ids), 4)
        done = prefill.submit(job("kept", ids, res)).result(timeout=120)
        assert sum(r.bytes_sent for r in done.results) > 0
        assert _wait(lambda: decode.requests["kept"].landed == len(ids))  # notifications trail the WRITEs
        assert _wait(lambda: decode.requests["kept"].prefill_done)  # pushed, then done
        decode.cancel("kept")
        assert decode.quarantined_blocks == 0 and decode.blocks_used == 0
    finally:
        prefill.close()
        decode.close()
