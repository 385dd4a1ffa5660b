"""The NIXL KV data path between real processes (UCX over loopback), and its transfer plans.

Prefill and decode workers are long-lived processes ("actors") that each own a KV cache and one
NixlEndpoint, and run commands sent by the test, which plays the services: it carries the
decode side's landing bytes to the prefill side as a Reserve answer would.
"""

import ctypes
import dataclasses
import itertools
import multiprocessing as mp
import os
import random
import signal
import struct
import threading
import time

import numpy as np
import pytest
import torch
import xxhash

pytest.importorskip("nixl._api", reason="NIXL is not installed (pip install nixl)")

from bench.fragment import mixed_load_table  # noqa: E402
from ringserve.config import DecodeConfig, PrefillConfig, add_config_args, config_from_args  # noqa: E402
from ringserve.engine.config import ModelConfig  # noqa: E402
from ringserve.engine.kv_cache import KVCache, as_runs, blocks_needed  # noqa: E402
from ringserve.errors import InvalidArgument  # noqa: E402
from ringserve.kv_transfer.descriptors import plan_descriptors  # noqa: E402
from ringserve.kv_transfer.landing import (  # noqa: E402
    LANDING_VERSION,
    Done,
    Landed,
    Landing,
    PoolLayout,
    Pull,
    Reply,
    Staged,
    done_notif,
    landed_notif,
    parse_notif,
    pull_notif,
    reply_notif,
    staged_notif,
)
from ringserve.kv_transfer.nixl import NixlEndpoint, select_transport  # noqa: E402
from ringserve.kv_transfer.plan import balanced_shares, plan_moves  # noqa: E402
from ringserve.kv_transfer.secret import TAG_BYTES  # noqa: E402
from ringserve.kv_transfer.staging import Staging  # noqa: E402

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # loopback only: no stray interfaces in CI

LAYERS, HEADS, DIM = 2, 2, 8
CONFIG = ModelConfig(
    vocab_size=16,
    hidden_size=HEADS * DIM,
    intermediate_size=16,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=HEADS,
    head_dim=DIM,
)
PREFILL_BLOCK_SIZES = [4, 16, 5, 8]
DECODE_BLOCK_SIZES = [16, 4, 7, 8]


# --- the planner, in one process: descriptors executed with memmove --------------------------


def _memmove_descriptors(local, remote) -> None:
    for (src, n, _), (dst, _, _) in zip(local.tolist(), remote.tolist()):
        ctypes.memmove(dst, src, n)


def _rows(cache: KVCache, table, start: int, count: int) -> torch.Tensor:
    """KV rows [layers, 2, count, H, D] at cache positions [start, start + count) of a sequence."""
    slots = cache.slots(table, start, start + count)
    return torch.stack([cache.k.flatten(1, 2)[:, slots], cache.v.flatten(1, 2)[:, slots]], dim=1)


@pytest.mark.parametrize("seed", range(40))
def test_descriptors_copy_exactly_the_requested_rows(seed):
    rng = random.Random(seed)
    src_bs, dst_bs = rng.choice([1, 3, 4, 16]), rng.choice([1, 2, 4, 7, 16])
    src = KVCache(CONFIG, 24, src_bs, dtype=rng.choice([torch.float32, torch.bfloat16]))
    dst = KVCache(CONFIG, 24, dst_bs, dtype=src.k.dtype)
    for t in (src.k, src.v, dst.k, dst.v):
        t.copy_(torch.randn(t.shape))
    # Tables with runs of consecutive block ids (which coalesce) and jumps (which do not).
    src_table = rng.sample(range(24), 24) if rng.random() < 0.5 else list(range(24))
    dst_table = sorted(rng.sample(range(24), 24), key=lambda b: (b // 3) * rng.random())
    count = rng.randint(1, min(len(src_table) * src_bs, len(dst_table) * dst_bs) // 2)
    src_start = rng.randint(0, len(src_table) * src_bs - count)
    dst_start = rng.randint(0, len(dst_table) * dst_bs - count)
    before = (dst.k.clone(), dst.v.clone())
    local, remote = plan_descriptors(
        PoolLayout.of(src), src_table, src_start, PoolLayout.of(dst), dst_table, dst_start, count
    )
    _memmove_descriptors(local, remote)
    assert torch.equal(_rows(dst, dst_table, dst_start, count), _rows(src, src_table, src_start, count))
    # Nothing else changed: put the written rows back and compare the whole pool.
    written = dst.slots(dst_table, dst_start, dst_start + count)
    for now, old in zip((dst.k, dst.v), before):
        now.flatten(1, 2)[:, written] = old.flatten(1, 2)[:, written]
        assert torch.equal(now, old)


def test_contiguous_blocks_coalesce_into_one_descriptor_per_layer_and_side():
    src, dst = KVCache(CONFIG, 64, 16), KVCache(CONFIG, 64, 16)
    local, remote = plan_descriptors(PoolLayout.of(src), range(64), 0, PoolLayout.of(dst), range(10, 64), 0, 800)
    assert len(local) == len(remote) == 2 * LAYERS
    assert local[:, 1].sum() == 800 * 2 * LAYERS * HEADS * DIM * 4
    shuffled = list(range(64))
    random.Random(0).shuffle(shuffled)
    local, _ = plan_descriptors(PoolLayout.of(src), shuffled, 0, PoolLayout.of(dst), range(64), 0, 800)
    assert len(local) >= 2 * LAYERS * 40  # 50 blocks, few neighbours in a shuffle


def test_layouts_that_differ_are_refused():
    f32 = PoolLayout.of(KVCache(CONFIG, 4, 4))
    bf16 = PoolLayout.of(KVCache(CONFIG, 4, 4, dtype=torch.bfloat16))
    other = PoolLayout.of(KVCache(dataclasses.replace(CONFIG, head_dim=DIM * 2), 4, 4))
    for peer in (bf16, other):
        with pytest.raises(InvalidArgument, match="same model and --dtype"):
            plan_descriptors(f32, [0], 0, peer, [0], 0, 2)


def test_notifications_name_request_epoch_transfer_and_rows():
    assert parse_notif("peer", landed_notif("r", 7, "0.1", 5, 3)) == Landed("r", 7, "0.1", 5, 3, "peer")
    assert parse_notif("peer", done_notif("r", 7)) == Done("r", 7, "peer")
    for foreign in (b"selftest", b"ringserve-kv/2 {not json", b'ringserve-kv/2 {"request_id": "r"}'):
        assert parse_notif("peer", foreign) is None


def test_select_transport_and_config():
    assert select_transport("tcp") == "tcp"
    assert select_transport("nixl") == "nixl"  # CI installs nixl, and its loopback self-test runs here
    assert select_transport("auto") == "nixl"
    with pytest.raises(InvalidArgument, match="auto, nixl, tcp"):
        select_transport("rdma")
    import argparse

    for cls in (DecodeConfig, PrefillConfig):
        parser = argparse.ArgumentParser()
        add_config_args(parser, cls)
        assert config_from_args(cls, parser.parse_args([])).kv_transfer == "auto"
        assert config_from_args(cls, parser.parse_args(["--kv-transfer", "tcp"])).kv_transfer == "tcp"


# --- actors: real worker processes ------------------------------------------------------------


class Tally:
    """The decode side's counting in miniature: rows per request, once per transfer, waited on."""

    def __init__(self):
        self.rows: dict[str, int] = {}
        self.seen: set[tuple[str, int, str]] = set()
        self.cond = threading.Condition()

    def __call__(self, landed: Landed) -> None:
        with self.cond:
            key = (landed.request_id, landed.epoch, landed.transfer_id)
            if key not in self.seen:
                self.seen.add(key)
                self.rows[landed.request_id] = self.rows.get(landed.request_id, 0) + landed.count
                self.cond.notify_all()

    def wait(self, request_id: str, rows: int, timeout_s: float) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.rows.get(request_id, 0) >= rows, timeout_s), (
                f"{self.rows.get(request_id, 0)} of {rows} rows of {request_id} landed"
            )

    def discard(self, request_id: str) -> None:
        with self.cond:
            self.rows.pop(request_id, None)


class _State:
    """What an actor process keeps between commands."""

    def __init__(self, name: str, num_blocks: int, block_size: int, heads: int, report, key=None, staging=1 << 20):
        torch.set_num_threads(1)  # many processes share two cores
        config = dataclasses.replace(CONFIG, num_key_value_heads=heads, num_attention_heads=heads)
        self.cache = KVCache(config, num_blocks, block_size)
        self.tally = Tally()
        self.endpoint = NixlEndpoint(self.cache, name, self.tally, landing_key=key, staging_bytes=staging)
        self.epochs = itertools.count(1)
        self.tables: dict[str, list[int]] = {}
        self.snapshots: dict[str, tuple] = {}
        self.report = report


def _actor_main(name, num_blocks, block_size, heads, commands, results, key=None, staging=1 << 20):
    try:
        state = _State(
            name, num_blocks, block_size, heads, lambda value: results.put(("progress", value)), key, staging
        )
        results.put(("ok", "ready"))
    except BaseException as e:
        results.put(("error", (type(e).__name__, str(e))))
        return
    while (command := commands.get()) is not None:
        fn, args = command
        try:
            results.put(("ok", fn(state, *args)))
        except BaseException as e:  # the test asserts on errors too
            results.put(("error", (type(e).__name__, str(e))))
    state.endpoint.close()


class Actor:
    """A worker process with a KV cache and a NixlEndpoint, running the functions it is sent."""

    def __init__(self, name: str, num_blocks: int, block_size: int, heads: int = HEADS, key=None, staging=1 << 20):
        ctx = mp.get_context("forkserver")
        # Actors fork from one server process that has imported torch and NIXL once (but made no
        # agent): starting eight costs a second, not eight torch imports on two cores.
        ctx.set_forkserver_preload(["ringserve.kv_transfer.nixl"])
        self.name, self.commands, self.results = name, ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=_actor_main,
            args=(name, num_blocks, block_size, heads, self.commands, self.results, key, staging),
            daemon=True,
        )
        self.proc.start()

    def send(self, fn, *args) -> None:
        self.commands.put((fn, args))

    def result(self, timeout: float = 30.0, expect: str = "ok"):
        status, value = self.results.get(timeout=timeout)
        assert status == expect, f"{self.name}: {status}: {value}"
        return value

    def call(self, fn, *args, timeout: float = 30.0):
        self.send(fn, *args)
        return self.result(timeout)

    def fails(self, fn, *args, timeout: float = 30.0) -> tuple[str, str]:
        """Run ``fn`` expecting an error; returns (error type, message)."""
        self.send(fn, *args)
        return self.result(timeout, expect="error")


def _start(specs) -> list[Actor]:
    actors = [Actor(*spec) for spec in specs]
    for a in actors:
        assert a.result(timeout=120) == "ready"
    return actors


def _stop(actors: list[Actor]) -> None:
    for a in actors:
        if a.proc.is_alive():
            a.commands.put(None)
    for a in actors:
        a.proc.join(timeout=10)
        if a.proc.is_alive():
            a.proc.kill()


@pytest.fixture(scope="module")
def workers():
    """Four prefill and four decode workers with different block sizes."""
    actors = _start(
        [(f"test-prefill-{i}", 64, bs) for i, bs in enumerate(PREFILL_BLOCK_SIZES)]
        + [(f"test-decode-{i}", 64, bs) for i, bs in enumerate(DECODE_BLOCK_SIZES)]
    )
    yield actors[:4], actors[4:]
    _stop(actors)


# Commands (run inside the actors).


def _reserve(state: _State, request_id: str, num_tokens: int) -> bytes:
    """Decode side: take blocks, remember the pool as it was, answer with a landing."""
    table = state.cache.allocator.allocate(blocks_needed(num_tokens, state.cache.block_size))
    state.tables[request_id] = table
    state.snapshots[request_id] = (state.cache.k.clone(), state.cache.v.clone())
    return state.endpoint.landing(request_id, next(state.epochs), table, num_tokens)


def _receive(state: _State, request_id: str, expected: torch.Tensor, timeout_s: float = 10.0, heads=None):
    """Decode side: wait for the notifications, then compare the rows (of ``heads`` only, if given);
    release the reservation.

    Returns (rows bit-identical, rest of the pool untouched, blocks in use afterwards)."""
    table = state.tables.pop(request_id)
    k0, v0 = state.snapshots.pop(request_id)
    heads = heads or range(state.cache.k.shape[-2])
    try:
        state.tally.wait(request_id, expected.shape[2], timeout_s)
        same = torch.equal(_rows(state.cache, table, 0, expected.shape[2])[:, :, :, heads.start : heads.stop], expected)
        written = state.cache.slots(table, 0, expected.shape[2])
        for now, old in ((state.cache.k, k0), (state.cache.v, v0)):
            cells = (slice(None), written, slice(heads.start, heads.stop))
            now.flatten(1, 2)[cells] = old.flatten(1, 2)[cells]
        # Bits, not values: an unwritten slot may hold NaN, which equals nothing.
        untouched = all(
            torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in ((state.cache.k, k0), (state.cache.v, v0))
        )
    finally:
        state.cache.allocator.free(table)
        state.tally.discard(request_id)
    return same, untouched, state.cache.allocator.num_used


def _release(state: _State, request_id: str) -> int:
    state.cache.allocator.free(state.tables.pop(request_id))
    state.snapshots.pop(request_id, None)
    state.tally.discard(request_id)
    return state.cache.allocator.num_used


def _prefill(state: _State, rows: torch.Tensor, prefix: int) -> list[int]:
    """Prefill side: store rows after ``prefix`` rows of other KV, as a prefill rank's cache holds them."""
    n = prefix + rows.shape[2]
    table = state.cache.allocator.allocate(blocks_needed(n, state.cache.block_size))
    random.Random(n).shuffle(table)  # a pool in use is fragmented
    slots = state.cache.slots(table, prefix, n)
    for layer in range(rows.shape[0]):
        state.cache.write(layer, slots, rows[layer, 0], rows[layer, 1])
    return table


def _push(state: _State, rows: torch.Tensor, prefix: int, moves, timeout_s: float = 10.0):
    """Prefill side: push this rank's moves; returns (bytes, blocks in use after)."""
    table = _prefill(state, rows, prefix)
    sent = 0
    try:
        for i, (src_start, count, landing, dst_start) in enumerate(moves):
            sent += state.endpoint.push(
                table, prefix + src_start, count, landing, dst_start, f"{state.endpoint.name}-{i}", timeout_s
            )
    finally:
        state.cache.allocator.free(table)
    return sent, state.cache.allocator.num_used


def _push_until_failure(state: _State, landing: bytes, timeout_s: float):
    """Prefill side: push the whole pool again and again until a push fails.

    Returns (error type, message, when it failed on the monotonic clock, pushes done, blocks in
    use afterwards)."""
    table = state.cache.allocator.allocate(state.cache.allocator.num_free)
    n = Landing.from_bytes(landing).num_tokens
    done = 0
    try:
        while True:
            try:
                state.endpoint.push(table, 0, n, landing, 0, f"loop-{done}", timeout_s)
            except Exception as e:
                failed_at, error = time.monotonic(), (type(e).__name__, str(e))
                break
            done += 1
            if done == 2:
                state.report("pushing")
    finally:
        state.cache.allocator.free(table)
    return *error, failed_at, done, state.cache.allocator.num_used


# --- tests between processes ------------------------------------------------------------------


def _prefix_sums(counts):
    return [sum(counts[:i]) for i in range(len(counts))]


@pytest.mark.parametrize("n,k", list(itertools.product([1, 2, 3, 4], [1, 2, 3, 4])))
def test_n_prefill_ranks_to_k_decode_ranks_is_bit_identical(workers, n, k):
    prefill, decode = workers
    rng = random.Random(n * 10 + k)
    counts = [rng.randint(1, 40) for _ in range(n)]
    counts[0] += k  # every decode rank gets at least one token
    shares = balanced_shares(sum(counts), k)
    kv = torch.randn(LAYERS, 2, sum(counts), HEADS, DIM, generator=torch.Generator().manual_seed(n * 10 + k))
    rid = f"req-{n}x{k}"
    for d in range(k):
        decode[d].send(_reserve, rid, shares[d])
    landings = [decode[d].result() for d in range(k)]
    moves = plan_moves(counts, shares)
    for s, start in enumerate(_prefix_sums(counts)):
        mine = [(m.src_start, m.count, landings[m.dst_rank], m.dst_start) for m in moves if m.src_rank == s]
        prefill[s].send(_push, kv[:, :, start : start + counts[s]], rng.randint(0, 9), mine)
    pushed = [prefill[s].result() for s in range(n)]
    assert sum(sent for sent, _ in pushed) == kv.numel() * kv.element_size()
    assert [used for _, used in pushed] == [0] * n  # back to baseline
    for d, start in enumerate(_prefix_sums(shares)):
        decode[d].send(_receive, rid, kv[:, :, start : start + shares[d]])
    # Per decode rank: rows bit-identical, nothing else in the pool written, blocks back to baseline.
    assert [decode[d].result() for d in range(k)] == [(True, True, 0)] * k


def test_corrupt_or_foreign_landings_are_refused_and_later_pushes_work(workers):
    prefill, decode = workers
    rows = torch.randn(LAYERS, 2, 20, HEADS, DIM)
    landing = decode[0].call(_reserve, "corrupt", 20)
    flipped = bytearray(landing)
    flipped[len(landing) // 2] ^= 0x40
    newer = bytearray(landing[:-8])
    struct.pack_into("<H", newer, 4, LANDING_VERSION + 1)
    newer = bytes(newer) + xxhash.xxh3_64_digest(bytes(newer))
    for bad, error, message in [
        (landing[:-7], "InvalidArgument", "corrupt or truncated"),
        (landing[:30], "InvalidArgument", "corrupt or truncated"),
        (bytes(flipped), "InvalidArgument", "corrupt or truncated"),
        (b"{'agent': 'x'}", "InvalidArgument", "wrong magic"),
        (newer, "FailedPrecondition", "same ringserve version"),
    ]:
        err, msg = prefill[0].fails(_push, rows, 0, [(0, 20, bad, 0)])
        assert err == error and message in msg and "Reserve answer" in msg
    err, msg = prefill[0].fails(_push, rows, 0, [(0, 20, landing, 1)])
    assert err == "InvalidArgument" and "outside [0, 20)" in msg
    assert prefill[0].call(_push, rows, 0, [(0, 20, landing, 0)])[1:] == (0,)
    assert decode[0].call(_receive, "corrupt", rows) == (True, True, 0)


def _untouched(state: _State, request_id: str) -> tuple[bool, int]:
    """Decode side: (the pool is bit for bit as it was at reserve, rows of ``request_id`` reported landed)."""
    k0, v0 = state.snapshots[request_id]
    same = all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in ((state.cache.k, k0), (state.cache.v, v0))
    )
    return same, state.tally.rows.get(request_id, 0)


def test_forged_landings_are_refused_before_any_write():
    """With a deployment secret: a landing signed under another secret, one altered after signing
    (its blocks aimed elsewhere) and an unsigned one are refused with PermissionDenied; the decode
    pool is untouched and no notification arrived. The genuine landing then lands exactly."""
    key = b"deployment-secret-0123456789"
    prefill, decode = _start([("keyed-prefill", 32, 4, HEADS, key), ("keyed-decode", 32, 8, HEADS, key)])
    try:
        rows = torch.randn(LAYERS, 2, 12, HEADS, DIM)
        landing = decode.call(_reserve, "forged", 12)
        parsed = Landing.from_bytes(landing, key)
        aimed = bytearray(landing)
        aimed[-TAG_BYTES - 4] ^= 0x01  # the last block id
        for bad, message in [
            (parsed.to_bytes(b"another-deployments-secret"), "fails its MAC"),
            (bytes(aimed), "fails its MAC"),
            (parsed.to_bytes(), "not signed with the deployment secret"),
        ]:
            err, msg = prefill.fails(_push, rows, 0, [(0, 12, bad, 0)])
            assert err == "PermissionDenied" and message in msg
        time.sleep(0.5)  # a notification, had any WRITE happened, would be in by now
        assert decode.call(_untouched, "forged") == (True, 0)
        assert prefill.call(_push, rows, 0, [(0, 12, landing, 0)])[1:] == (0,)
        assert decode.call(_receive, "forged", rows) == (True, True, 0)
    finally:
        _stop([prefill, decode])


BIG_HEADS = 64  # 2 KiB per row, layer and side: pushes of 32 MiB take a while on loopback


def test_killed_decode_worker_fails_the_push_within_seconds_and_its_restart_is_usable():
    prefill, decode = _start([("test-prefill-x", 256, 16, BIG_HEADS), ("test-decode-x", 256, 16, BIG_HEADS)])
    try:
        old = decode.call(_reserve, "big", 256 * 16)
        prefill.send(_push_until_failure, old, 10.0)
        assert prefill.result(expect="progress") == "pushing"
        time.sleep(0.1)
        killed_at = time.monotonic()
        decode.proc.kill()
        err, msg, failed_at, done, used = prefill.result()
        assert err == "Unavailable" and "agent test-decode-x" in msg and "retry" in msg
        assert failed_at - killed_at < 5.0, f"the failure took {failed_at - killed_at:.1f} s to surface"
        assert used == 0

        decode = _start([("test-decode-x", 256, 16, BIG_HEADS)])[0]  # same agent name, new metadata
        rows = torch.randn(LAYERS, 2, 100, BIG_HEADS, DIM)
        fresh = decode.call(_reserve, "after-restart", 100)
        assert prefill.call(_push, rows, 3, [(0, 100, fresh, 0)])[1:] == (0,)
        assert decode.call(_receive, "after-restart", rows) == (True, True, 0)
        err, msg = prefill.fails(_push, rows, 3, [(0, 100, old, 0)])
        assert err == "Unavailable" and "earlier run" in msg

        # A worker that stops responding times out; once it runs again it is usable again.
        stuck = decode.call(_reserve, "stuck", 256 * 16)
        os.kill(decode.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            prefill.send(_push_until_failure, stuck, 1.0)
            err, msg, failed_at, done, used = prefill.result()
        finally:
            os.kill(decode.proc.pid, signal.SIGCONT)
        assert err == "Unavailable" and "not complete after 1.0 s" in msg
        assert failed_at - started < 5.0 and used == 0
        assert decode.call(_release, "stuck") == 0
        again = decode.call(_reserve, "resumed", 100)
        assert prefill.call(_push, rows, 0, [(0, 100, again, 0)])[1:] == (0,)
        assert decode.call(_receive, "resumed", rows) == (True, True, 0)
    finally:
        _stop([prefill, decode])


@pytest.mark.parametrize("seed", range(20))
def test_descriptors_copy_exactly_a_head_sub_range_of_the_rows(seed):
    """TP: a source rank's heads fill part of each destination row (strided: one descriptor per row)."""
    rng = random.Random(seed)
    src_h, dst_h = rng.choice([(1, 2), (2, 1), (4, 2), (2, 4), (1, 1), (3, 3)])
    n = rng.randint(1, min(src_h, dst_h))
    src_heads = range(a := rng.randint(0, src_h - n), a + n)
    dst_heads = range(b := rng.randint(0, dst_h - n), b + n)
    src_bs, dst_bs = rng.choice([1, 3, 4]), rng.choice([2, 5, 16])
    src = KVCache(dataclasses.replace(CONFIG, num_key_value_heads=src_h), 16, src_bs)
    dst = KVCache(dataclasses.replace(CONFIG, num_key_value_heads=dst_h), 16, dst_bs)
    for t in (src.k, src.v, dst.k, dst.v):
        t.copy_(torch.randn(t.shape))
    src_table, dst_table = rng.sample(range(16), 16), rng.sample(range(16), 16)
    count = rng.randint(1, min(16 * src_bs, 16 * dst_bs) // 2)
    src_start, dst_start = rng.randint(0, 16 * src_bs - count), rng.randint(0, 16 * dst_bs - count)
    before = (dst.k.clone(), dst.v.clone())
    local, remote = plan_descriptors(
        PoolLayout.of(src), src_table, src_start, PoolLayout.of(dst), dst_table, dst_start, count, src_heads, dst_heads
    )
    if not n == src_h == dst_h:  # a part of each row: one descriptor per row, layer and K/V
        assert len(local) == len(remote) == 2 * LAYERS * count
    _memmove_descriptors(local, remote)
    got = _rows(dst, dst_table, dst_start, count)
    want = _rows(src, src_table, src_start, count)
    assert torch.equal(got[:, :, :, dst_heads.start : dst_heads.stop], want[:, :, :, src_heads.start : src_heads.stop])
    # Nothing else changed: put the written heads back and compare the whole pool.
    written = dst.slots(dst_table, dst_start, dst_start + count)
    for now, old in zip((dst.k, dst.v), before):
        flat_now, flat_old = now.flatten(1, 2), old.flatten(1, 2)
        flat_now[:, written, dst_heads.start : dst_heads.stop] = flat_old[:, written, dst_heads.start : dst_heads.stop]
        assert torch.equal(now, old)


def test_whole_head_ranges_keep_the_row_descriptors_and_bad_ranges_are_refused():
    src, dst = KVCache(CONFIG, 64, 16), KVCache(CONFIG, 64, 16)
    args = (PoolLayout.of(src), range(64), 0, PoolLayout.of(dst), range(10, 64), 0, 800)
    plain = plan_descriptors(*args)
    whole = plan_descriptors(*args, range(HEADS), range(HEADS))
    assert all(np.array_equal(a, b) for a, b in zip(plain, whole)) and len(plain[0]) == 2 * LAYERS
    for src_heads, dst_heads, match in (
        (range(1), range(2), "cannot fill"),
        (range(1, 3), range(2), "inside the pool"),
        (range(0), range(0), "inside the pool"),
    ):
        with pytest.raises(InvalidArgument, match=match):
            plan_descriptors(*args, src_heads, dst_heads)
    one = PoolLayout.of(KVCache(dataclasses.replace(CONFIG, num_key_value_heads=1), 4, 4))
    with pytest.raises(InvalidArgument, match="cannot fill"):  # whole rows of pools with different heads
        plan_descriptors(PoolLayout.of(src), [0], 0, one, [0], 0, 2)


def test_notifications_of_head_pieces_name_the_heads():
    assert parse_notif("p", landed_notif("r", 7, "0.1", 5, 3, range(2, 4))) == Landed(
        "r", 7, "0.1", 5, 3, "p", range(2, 4)
    )
    assert b"heads" not in landed_notif("r", 7, "0.1", 5, 3)  # whole rows: the notification of TP 1


# --- coalescing: runs of blocks from the allocator, head sub-ranges through the staging buffer ----


@pytest.mark.parametrize("seed", range(5))
def test_after_a_mixed_load_a_request_moves_in_few_descriptors(seed):
    """The allocator hands out runs and the descriptors follow them: at most one descriptor per
    run of either side, per layer and K/V (a shuffled table needs about one per block)."""
    src, dst = KVCache(CONFIG, 400, 4), KVCache(CONFIG, 400, 4)
    src_table, dst_table = mixed_load_table(400, 100, seed), mixed_load_table(400, 100, seed + 100)
    runs = len(as_runs(src_table)) + len(as_runs(dst_table))
    assert max(len(as_runs(src_table)), len(as_runs(dst_table))) <= 25  # lowest free ids first: 35-56
    local, remote = plan_descriptors(PoolLayout.of(src), src_table, 0, PoolLayout.of(dst), dst_table, 0, 400)
    assert len(local) == len(remote) <= 2 * LAYERS * runs
    for t in (src.k, src.v):
        t.copy_(torch.randn(t.shape))
    _memmove_descriptors(local, remote)
    assert torch.equal(_rows(dst, dst_table, 0, 400), _rows(src, src_table, 0, 400))


@pytest.mark.parametrize("seed", range(12))
def test_a_staged_head_sub_range_moves_as_whole_rows(seed):
    """A source head sub-range into a destination holding just those heads: gathered into the
    staging buffer, then one descriptor per destination run (not one per row), bit for bit."""
    rng = random.Random(seed)
    src_h, n = rng.choice([(2, 1), (4, 2), (4, 1), (3, 2)])
    heads = range(a := rng.randint(0, src_h - n), a + n)
    src = KVCache(dataclasses.replace(CONFIG, num_key_value_heads=src_h), 16, rng.choice([1, 3, 4]))
    dst = KVCache(dataclasses.replace(CONFIG, num_key_value_heads=n), 16, rng.choice([2, 5, 16]))
    for t in (src.k, src.v):
        t.copy_(torch.randn(t.shape))
    src_table, dst_table = rng.sample(range(16), 16), list(range(16))
    count = rng.randint(1, min(16 * src.block_size, 16 * dst.block_size) // 2)
    src_start, dst_start = rng.randint(0, 16 * src.block_size - count), rng.randint(0, 16 * dst.block_size - count)
    row = 2 * LAYERS * n * DIM * 4
    staging = Staging(src, row * rng.randint(1, count))  # from one row per chunk to all of them
    chunks = list(staging.chunks(count, heads))
    assert len(chunks) == -(-count // (len(staging.buffer) // row))
    for first, rows in chunks:
        packed = staging.gather(PoolLayout.of(src), src_table, src_start + first, rows, heads)
        local, remote = plan_descriptors(packed, [0], 0, PoolLayout.of(dst), dst_table, dst_start + first, rows)
        assert len(local) == 2 * LAYERS  # dst_table is one run: one descriptor per layer and K/V
        _memmove_descriptors(local, remote)
    got = _rows(dst, dst_table, dst_start, count)
    assert torch.equal(got, _rows(src, src_table, src_start, count)[:, :, :, heads.start : heads.stop])


def test_a_staging_buffer_smaller_than_a_row_is_refused():
    with pytest.raises(InvalidArgument, match="holds no row"):
        list(Staging(KVCache(CONFIG, 4, 4), 10).chunks(3, range(1)))


def _push_heads(state: _State, rows: torch.Tensor, heads, landing: bytes, dst_heads=None, timeout_s: float = 10.0):
    """Prefill side: store rows (every head), push heads ``heads`` of them (into ``dst_heads``);
    returns (bytes, descriptors posted, blocks in use after)."""
    table = _prefill(state, rows, 3)
    before = state.endpoint.descriptors_posted
    try:
        sent = state.endpoint.push(table, 3, rows.shape[2], landing, 0, "heads", timeout_s, heads, dst_heads)
    finally:
        state.cache.allocator.free(table)
    return sent, state.endpoint.descriptors_posted - before, state.cache.allocator.num_used


def test_a_tp_rank_pushes_its_heads_to_a_decode_rank_of_higher_tp_through_staging():
    """(TP 1 -> TP 2): a 4-head prefill rank sends heads 2..3 of a fragmented table to a 2-head
    decode rank in chunks of the staging buffer: whole rows there, few descriptors, bit for bit."""
    row = 2 * LAYERS * 2 * DIM * 4
    prefill, decode = _start([("staged-prefill", 64, 4, 4, None, 40 * row), ("staged-decode", 64, 8, 2)])
    try:
        rows = torch.randn(LAYERS, 2, 100, 4, DIM)
        for rid, heads in (("upper", range(2, 4)), ("lower", range(0, 2))):
            landing = decode.call(_reserve, rid, 100)
            sent, descriptors, used = prefill.call(_push_heads, rows, heads, landing)
            assert (sent, used) == (rows[:, :, :, heads.start : heads.stop].numel() * 4, 0)
            assert descriptors == 3 * 2 * LAYERS  # 3 chunks of <= 40 rows into one run (per-row: 100x)
            assert decode.call(_receive, rid, rows[:, :, :, heads.start : heads.stop].contiguous()) == (True, True, 0)
    finally:
        _stop([prefill, decode])


def _descriptors(state: _State) -> int:
    return state.endpoint.descriptors_posted


def test_head_pieces_strided_on_the_decode_side_are_pulled_into_place():
    """(TP 2 -> TP 1, and a sub-range of both): the prefill rank packs its rows and WRITEs them
    into the decode rank's staging buffer, a piece as large as that buffer at a time, and the
    decode rank stores them into just those heads of its rows; the rows' other heads and the rest
    of the pool stay as they were, bit for bit."""
    row = 2 * LAYERS * 2 * DIM * 4
    prefill, decode = _start([("pull-prefill", 64, 4, 2, None, 70 * row), ("pull-decode", 64, 8, 4, None, 30 * row)])
    try:
        rows = torch.randn(LAYERS, 2, 100, 2, DIM)
        for rid, heads, dst_heads in (("upper", None, range(2, 4)), ("inner", range(1, 2), range(1, 2))):
            landing = decode.call(_reserve, rid, 100)
            sent, descriptors, used = prefill.call(_push_heads, rows, heads, landing, dst_heads)
            part = rows if heads is None else rows[:, :, :, heads.start : heads.stop].contiguous()
            # Chunks of <= 70 rows here (140 of one head), pieces of <= 30 (60) there: 30+30+10+30 (60+40).
            pieces = 4 if heads is None else 2
            assert (sent, descriptors, used) == (part.numel() * 4, pieces * 2 * LAYERS, 0)
            assert decode.call(_receive, rid, part, 10.0, dst_heads) == (True, True, 0)
        assert decode.call(_descriptors) == 0  # the decode side posts nothing
    finally:
        _stop([prefill, decode])


def test_pull_notifications_round_trip():
    pull = Pull("r", 7, "0.1/2+0", 5, 3, range(1, 2), (4, 9), 1, "p", 11, b"\x00meta\xff")
    assert parse_notif("p", pull_notif(pull)) == pull
    grant = Reply("r", 7, "0.1/2+0", "d", "grant", 3, 1 << 40, 1 << 41)
    assert parse_notif("d", reply_notif(grant)) == grant
    assert parse_notif("d", reply_notif(Reply("r", 7, "t", "x", "stored", error="no room"))).error == "no room"
    assert parse_notif("p", staged_notif("r", 7, "t")) == Staged("r", 7, "t", "p")
