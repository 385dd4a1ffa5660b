"""KV handoff between parallel layouts: (TP, CP) prefill ranks -> (TP', KVP') decode ranks.

The plan is checked exhaustively over small layouts; the handoffs move real KVCache shards of one
single-process KV (random float32) over TCP and over NIXL (UCX loopback) and check the
reassembled destinations bit-identical to it.
"""

import itertools
import multiprocessing as mp
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from test_decode_worker import drain, prompt_kv_and_first_token

from ringserve.config import DecodeConfig
from ringserve.decode_service.group import DecodeGroup, _receivers
from ringserve.decode_service.kvp import KVPRank
from ringserve.decode_service.landed_rows import Added, LandedRows
from ringserve.decode_service.protocol import RowsLanded
from ringserve.decode_service.worker import DecodeWorker
from ringserve.engine.config import ModelConfig
from ringserve.engine.engine import Engine
from ringserve.engine.kv_cache import KVCache, blocks_needed
from ringserve.engine.model import Llama
from ringserve.engine.sampling import SamplingParams
from ringserve.engine.tp import kv_heads
from ringserve.errors import InvalidArgument
from ringserve.kv_transfer.nixl import NixlEndpoint
from ringserve.kv_transfer.plan import Want, balanced_shares, check_wants, plan_layout, plan_moves
from ringserve.prefill_service.push import SourceRank, Target, check_targets, push_kv
from ringserve.v1 import common_pb2

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # loopback only: no stray interfaces in CI


def decode_wants(total: int, kvp: int, tp: int, num_kv_heads: int) -> list[Want]:
    """A (TP', KVP') decode layout's wants, KVP rank major (what a decode leader's targets say)."""
    shares = balanced_shares(total, kvp)
    return [Want(sum(shares[:r]), shares[r], kv_heads(t, tp, num_kv_heads)) for r in range(kvp) for t in range(tp)]


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


# --- the receiving side's count: a row is complete once every head of it landed ---------------


def test_a_row_counts_once_every_head_piece_landed_each_piece_once():
    rows = LandedRows(4)
    assert rows.add(0, 10, range(0, 2)) == Added(20, 20, 0)
    assert rows.add(5, 10, range(2, 4)) == Added(10, 10, 5)  # rows 5..9 now have every head
    assert rows.add(0, 10, range(0, 2)).repeated  # a retried piece adds nothing
    assert rows.add(0, 6, range(2, 4)) == Added(10, 12, 5)  # two cells had landed, five rows complete
    assert rows.add(3, 4) == Added(0, 4, 0)  # whole rows, all landed before
    assert rows.holds(range(2, 4)) and rows.holds(None) and not rows.holds(range(3, 5))
    with pytest.raises(ValueError, match="outside"):
        rows.add(0, 1, range(3, 5))  # a stray piece: heads this rank does not hold
    whole = LandedRows()
    assert whole.add(0, 5) == Added(5, 5, 5) and whole.add(3, 8).completed == 3


# --- handoffs between real caches, over TCP and NIXL -----------------------------------------


LAYERS, DIM, SRC_BLOCK, DST_BLOCK = 2, 4, 4, 5


@dataclass(frozen=True)
class Handoff:
    """Prefill (TP, CP) -> decode (TP', KVP') for a model with ``heads`` KV heads."""

    heads: int
    tp: int
    cp: int
    tp2: int
    kvp: int
    tokens: int

    def __str__(self) -> str:
        return f"H{self.heads}-tp{self.tp}xcp{self.cp}-to-tp{self.tp2}xkvp{self.kvp}"


HANDOFFS = [
    Handoff(2, 2, 2, 1, 2, 45),
    Handoff(2, 1, 3, 2, 1, 50),
    Handoff(2, 2, 1, 4, 1, 37),  # TP 4 over 2 KV heads: decode ranks hold replicated heads
    Handoff(2, 4, 1, 1, 2, 41),  # replicated on the prefill side: the rows split over replicas
    Handoff(8, 4, 2, 2, 3, 53),
    Handoff(8, 2, 3, 8, 2, 29),
    Handoff(3, 1, 2, 1, 2, 33),  # TP 1 both sides: whole rows, as before TP
]


def _config(local_kv_heads: int, layers: int = LAYERS, dim: int = DIM) -> ModelConfig:
    """A rank's model config: its local KV heads (and as many query heads)."""
    return ModelConfig(
        vocab_size=16,
        hidden_size=local_kv_heads * dim,
        intermediate_size=8,
        num_hidden_layers=layers,
        num_attention_heads=local_kv_heads,
        num_key_value_heads=local_kv_heads,
        head_dim=dim,
    )


def _reference(h: Handoff) -> torch.Tensor:
    """The single-process KV [layers, 2, tokens, heads, D] (random float32, from the layout's seed)."""
    return torch.randn(LAYERS, 2, h.tokens, h.heads, DIM, generator=torch.Generator().manual_seed(h.tokens))


def _cp_tokens(h: Handoff) -> list[list[int]]:
    """The tokens each CP rank holds, as load-balanced sharding lays them: pieces r and 2N-1-r."""
    sizes = balanced_shares(h.tokens, 2 * h.cp)
    pieces = [list(range(sum(sizes[:i]), sum(sizes[: i + 1]))) for i in range(2 * h.cp)]
    return [pieces[r] + pieces[2 * h.cp - 1 - r] for r in range(h.cp)]


def _prefill_side(
    h: Handoff, target_bytes: list[bytes], transport: str, ref: torch.Tensor | None = None
) -> tuple[int, list[int]]:
    """One process for all (TP x CP) prefill ranks: each a KVCache of its local heads holding its
    tokens of ``ref`` (default: the layout's random KV) in fragmented blocks, pushing concurrently
    with ``push_kv``. Returns (bytes sent, blocks each allocator holds afterwards)."""
    torch.set_num_threads(1)
    ref = _reference(h) if ref is None else ref
    tokens = _cp_tokens(h)
    targets = [Target.from_proto(common_pb2.KVTarget.FromString(b)) for b in target_bytes]
    check_targets(targets, h.tokens, h.heads)
    ranks = []
    for c, t in itertools.product(range(h.cp), range(h.tp)):
        heads = kv_heads(t, h.tp, h.heads)
        cache = KVCache(_config(len(heads), ref.shape[0], ref.shape[-1]), 32, SRC_BLOCK)
        table = cache.allocator.allocate(blocks_needed(len(tokens[c]), SRC_BLOCK))
        random.Random(c * 10 + t).shuffle(table)
        slots = cache.slots(table, 0, len(tokens[c]))
        for layer in range(ref.shape[0]):
            rows = ref[layer][:, tokens[c]][:, :, heads.start : heads.stop]
            cache.write(layer, slots, rows[0], rows[1])
        endpoint = NixlEndpoint(cache) if transport == "nixl" else None
        ranks.append((cache, table, SourceRank(c, h.heads, t, h.tp), endpoint))
    counts = [len(t) for t in tokens]
    try:
        with ThreadPoolExecutor(len(ranks)) as pool:
            sent = [
                pool.submit(push_kv, cache, table, "req", targets, counts, source, endpoint, 30.0)
                for cache, table, source, endpoint in ranks
            ]
            total = sum(f.result() for f in sent)
    finally:
        for cache, table, _, endpoint in ranks:
            cache.allocator.free(table)
            if endpoint is not None:
                endpoint.close()
    return total, [cache.allocator.num_used for cache, *_ in ranks]


def _side_main(commands, results) -> None:
    while (command := commands.get()) is not None:
        try:
            results.put(("ok", _prefill_side(*command)))
        except BaseException as e:
            results.put(("error", f"{type(e).__name__}: {e}"))


@pytest.fixture(scope="module")
def prefill_side():
    """The prefill side: a process of its own, running each handoff it is sent."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["ringserve.kv_transfer.nixl", "ringserve.prefill_service.push"])
    commands, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_side_main, args=(commands, results), daemon=True)
    proc.start()

    def run(h: Handoff, target_bytes: list[bytes], transport: str, ref: torch.Tensor | None = None):
        commands.put((h, target_bytes, transport, ref))
        status, value = results.get(timeout=120)
        assert status == "ok", value
        return value

    yield run
    commands.put(None)
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()


class DecodeRank:
    """One (KVP, TP') decode rank: a KVCache of its local heads, a KVPRank holding its share, its
    receivers as the decode group builds them, and the leader's count of its landed rows."""

    def __init__(self, h: Handoff, kvp_rank: int, tp_rank: int, transport: str, first: int, share: int):
        self.heads = kv_heads(tp_rank, h.tp2, h.heads)
        config = _config(len(self.heads))
        self.cache = KVCache(config, 32, DST_BLOCK)
        self.rank = KVPRank(Llama(config), self.cache, rank=kvp_rank * h.tp2 + tp_rank)
        self.first, self.share = first, share
        self.table = self.cache.allocator.allocate(blocks_needed(share, DST_BLOCK))
        self.rank.reserve("req", 1, self.table, first, share)
        self.landed, self.repeated, self.cond = LandedRows(len(self.heads)), 0, threading.Condition()
        cfg = DecodeConfig(host="127.0.0.1", kv_transfer=transport)
        self.receiver, self.endpoint = _receivers(cfg, self.rank, self.rank.rank, self._on_landed, lambda *done: None)
        self.complete = 0

    def _on_landed(self, note: RowsLanded) -> None:
        with self.cond:
            added = self.landed.add(note.first, note.first + note.count, note.heads)
            self.repeated += added.repeated
            self.complete += added.completed
            self.cond.notify_all()

    def target(self, h: Handoff) -> bytes:
        landing = self.endpoint.landing("req", 1, self.table, self.share) if self.endpoint else b""
        replicated = h.tp2 > 1
        return common_pb2.KVTarget(
            rank=self.rank.rank,
            address=self.receiver.address,
            first_position=self.first,
            num_tokens=self.share,
            nixl_landing=landing,
            epoch=1,
            first_kv_head=self.heads.start if replicated else 0,
            kv_heads=len(self.heads) if replicated else 0,
        ).SerializeToString()

    def rows(self) -> torch.Tensor:
        """Its share as [layers, 2, share, local heads, D], once every row landed."""
        with self.cond:
            assert self.cond.wait_for(lambda: self.complete == self.share, 30), f"{self.complete} of {self.share}"
        slots = self.cache.slots(self.table, 0, self.share)
        return torch.stack([self.cache.k.flatten(1, 2)[:, slots], self.cache.v.flatten(1, 2)[:, slots]], dim=1)

    def close(self) -> int:
        """Free everything; returns the blocks still in use (0)."""
        self.rank.free("req", 1)
        self.cache.allocator.free(self.table)
        self.receiver.close()
        if self.endpoint is not None:
            self.endpoint.close()
        return self.cache.allocator.num_used + len(self.rank.shards)


@pytest.mark.parametrize("transport", ["tcp", "nixl"])
@pytest.mark.parametrize("h", HANDOFFS, ids=str)
def test_handoff_between_layouts_is_bit_identical_to_the_single_process_kv(prefill_side, h, transport):
    if transport == "nixl":
        pytest.importorskip("nixl._api", reason="NIXL is not installed (pip install nixl)")
    ref, tokens = _reference(h), _cp_tokens(h)
    order = [t for ts in tokens for t in ts]  # the plan's token order: CP ranks' tokens end to end
    shares = balanced_shares(h.tokens, h.kvp)
    ranks = [DecodeRank(h, r, t, transport, sum(shares[:r]), shares[r]) for r in range(h.kvp) for t in range(h.tp2)]
    try:
        sent, held = prefill_side(h, [d.target(h) for d in ranks], transport)
        out = torch.full_like(ref, float("nan"))
        for d in ranks:
            mine = order[d.first : d.first + d.share]
            rows = d.rows()
            assert torch.equal(rows, ref[:, :, mine][:, :, :, d.heads.start : d.heads.stop])  # each replica too
            out[:, :, mine, d.heads.start : d.heads.stop] = rows
        assert torch.equal(out, ref)
        cells = h.tokens * h.heads * max(1, h.tp2 // h.heads)  # every decode replica of a head
        assert sent == cells * 2 * LAYERS * DIM * 4
        assert held == [0] * (h.tp * h.cp)
        assert all(d.repeated == 0 and not d.receiver.dropped for d in ranks)
    finally:
        assert [d.close() for d in ranks] == [0] * len(ranks)


@pytest.mark.parametrize("transport", ["tcp", "nixl"])
def test_a_decode_group_takes_head_pieces_from_tp_ranks_and_decodes_exactly(prefill_side, default_model, transport):
    """(TP 3, CP 2) prefill ranks, each holding one of the default model's 3 KV heads of its tokens,
    push into a real TP 1 decode group (its receivers, its leader's count of head pieces): the
    decode starts once every piece landed, and greedy decoding equals the single-process engine."""
    if transport == "nixl":
        pytest.importorskip("nixl._api", reason="NIXL is not installed (pip install nixl)")
    model, tokenizer = default_model
    ids = tokenizer.encode("The capital of France is")
    h = Handoff(model.config.num_key_value_heads, 3, 2, 1, 1, len(ids))
    kv, first = prompt_kv_and_first_token(model, ids)
    order = [t for ts in _cp_tokens(h) for t in ts]  # the decode share holds the rows in the plan's order
    group = DecodeGroup(DecodeConfig(kv_blocks=16, block_size=16, kv_transfer=transport), model=model)
    worker = DecodeWorker(group, tokenizer, reservation_ttl_s=60.0)
    try:
        res = worker.reserve("req", len(ids), 8)
        [(rank, address, start, count, landing, *_)] = res.targets
        target = common_pb2.KVTarget(
            rank=rank, address=address, first_position=start, num_tokens=count, nixl_landing=landing, epoch=res.epoch
        )
        # The prefill side's KV in its ranks' order: the plan lays CP ranks' tokens end to end.
        sent, held = prefill_side(h, [target.SerializeToString()], transport, kv[:, :, order].contiguous())
        assert sent == kv.numel() * 4 and held == [0] * 6
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        got = [e.token_id for e in drain(worker.start("req", len(ids), first, params))]
        assert got == [e.token_id for e in Engine(model, tokenizer).generate(ids, params)]
        assert not worker.dropped and not group.receiver.dropped
    finally:
        worker.close()
    assert worker.blocks_used == 0


def test_push_kv_refuses_a_layout_or_targets_that_do_not_fit_before_sending():
    cache = KVCache(_config(2), 4, SRC_BLOCK)  # a rank holding 2 KV heads
    targets = [Target("127.0.0.1:1", 0, 5, kv_heads=range(0, 2)), Target("127.0.0.1:1", 0, 5, kv_heads=range(2, 4))]
    check_targets(targets, 5, 4)
    with pytest.raises(InvalidArgument, match="should hold KV heads range"):
        push_kv(cache, [0, 1], "r", targets, [5], SourceRank(0, 4, 0, 4), None, 1.0)  # TP 4 of 4: one head
    for bad in ([targets[0]], [*targets, Target("127.0.0.1:1", 0, 6)]):
        with pytest.raises(InvalidArgument, match="exactly once"):
            check_targets(bad, 5, 4)
        with pytest.raises(InvalidArgument, match="no transfer plan"):
            push_kv(cache, [0, 1], "r", bad, [5], SourceRank(0, 4, 0, 2), None, 1.0)
    with pytest.raises(InvalidArgument, match="there are none"):
        check_targets([], 5, 4)
