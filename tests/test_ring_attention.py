"""Ring pass-KV and pass-Q over real gloo process groups equal single-device attention."""

import random

import pytest
import torch
from multiproc import run_ranks, values

from ringserve.engine.attention import attend
from ringserve.prefill_service.ring import RingComm, RingLayout, SeqLayout, ring_pass_kv, ring_pass_q
from ringserve.prefill_service.sharding import plan_pass


def make_cases(world: int) -> list[dict]:
    rng = random.Random(world)
    cases = []
    for t in [1, 2, 5, 17, 64, 97]:
        for p in [0, 24, 9 * t + 3]:
            hkv = rng.choice([1, 2, 3])
            cases.append(
                dict(
                    t=t,
                    p=p,
                    hkv=hkv,
                    h=hkv * rng.choice([1, 2, 4]),
                    d=8,
                    bs=rng.choice([4, 16]),
                    seed=rng.randrange(1 << 30),
                )
            )
    return cases


def check_case(rank: int, world: int, case: dict) -> float:
    """Worst |ring - single-device| over this rank's rows, for both variants."""
    g = torch.Generator().manual_seed(case["seed"])
    t, p, h, hkv, d = case["t"], case["p"], case["h"], case["hkv"], case["d"]
    q = torch.randn(t, h, d, generator=g)
    k = torch.randn(p + t, hkv, d, generator=g)
    v = torch.randn(p + t, hkv, d, generator=g)
    expected = attend(q, k, v, causal=True)[0]
    # Cached tokens sit on ranks in an arbitrary uneven split (as earlier passes left them).
    rng = random.Random(case["seed"])
    cuts = sorted([0, p] + [rng.randint(0, p) for _ in range(world - 1)])
    cached = [cuts[r + 1] - cuts[r] for r in range(world)]
    plan = plan_pass(t, world, case["bs"])
    layout = RingLayout((SeqLayout(plan, tuple(cached)),))
    mine = plan.rank_tokens(rank)
    rows = torch.tensor(mine, dtype=torch.long)
    local_k = torch.cat([k[cuts[rank] : cuts[rank + 1]], k[p + rows]])
    local_v = torch.cat([v[cuts[rank] : cuts[rank + 1]], v[p + rows]])
    comm = RingComm()
    worst = 0.0
    for ring in (ring_pass_kv, ring_pass_q):
        out = ring(q[rows], [local_k], [local_v], layout, comm)
        worst = max(worst, (out - expected[rows]).abs().max().item() if len(mine) else 0.0)
    return worst


def run_all_cases(rank: int, world: int) -> list[float]:
    torch.manual_seed(0)
    return [check_case(rank, world, c) for c in make_cases(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_matches_single_device(world):
    per_rank = values(run_ranks(world, run_all_cases))
    worst = max(max(errs) for errs in per_rank)
    assert worst < 1e-5, f"ring attention differs from single-device by {worst}"


def check_packed(rank: int, world: int) -> float:
    """Several sequences in one pass (each sharded on its own, cached prefixes split unevenly):
    worst |ring - single-device| of each sequence's rows, for both variants."""
    rng = random.Random(100 + world)
    g = torch.Generator().manual_seed(world)
    h, hkv, d, bs = 4, 2, 8, 4
    layouts, expected, rows, q_local, k_local, v_local = [], [], [], [], [], []
    for t, p in [(1, 0), (5, 13), (17, 0), (64, 40), (3, 2), (1, 9)]:
        q, k, v = (
            torch.randn(t, h, d, generator=g),
            torch.randn(p + t, hkv, d, generator=g),
            torch.randn(p + t, hkv, d, generator=g),
        )
        expected.append(attend(q, k, v, causal=True)[0])
        cuts = sorted([0, p] + [rng.randint(0, p) for _ in range(world - 1)])
        plan = plan_pass(t, world, bs)
        layouts.append(SeqLayout(plan, tuple(cuts[r + 1] - cuts[r] for r in range(world))))
        mine = torch.tensor(plan.rank_tokens(rank), dtype=torch.long)
        rows.append(mine)
        q_local.append(q[mine])
        k_local.append(torch.cat([k[cuts[rank] : cuts[rank + 1]], k[p + mine]]))
        v_local.append(torch.cat([v[cuts[rank] : cuts[rank + 1]], v[p + mine]]))
    layout = RingLayout(tuple(layouts))
    worst = 0.0
    for ring in (ring_pass_kv, ring_pass_q):
        out = ring(torch.cat(q_local), k_local, v_local, layout, RingComm())
        for got, ref, mine in zip(layout.split_q(out, rank), expected, rows):
            if len(mine):
                worst = max(worst, (got - ref[mine]).abs().max().item())
    return worst


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packed_pass_matches_each_sequence_alone(world):
    worst = max(values(run_ranks(world, check_packed)))
    assert worst < 1e-5, f"a packed sequence differs from its single-device attention by {worst}"


@pytest.mark.parametrize("t", [1, 3, 63, 64, 65, 200, 1000, 4099])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("p", [0, 500])
def test_sharding_covers_all_tokens_and_balances_flops(t, world, p):
    bs = 64
    plan = plan_pass(t, world, bs)
    owned = sorted(i for r in range(world) for i in plan.rank_tokens(r))
    assert owned == list(range(t))
    assert t - 1 in plan.rank_tokens(0), "the last token must land on the leader"
    # Attention work of a rank: each of its queries attends to P cached keys plus its causal prefix.
    work = [sum(p + i + 1 for i in plan.rank_tokens(r)) for r in range(world)]
    block_worth = bs * (p + t)
    assert max(work) - min(work) <= block_worth, (work, block_worth)
