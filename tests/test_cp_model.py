"""The CP model forward over real gloo process groups equals the single-process engine."""

import os
import time

import pytest
import torch
from multiproc import run_ranks, values
from test_model import run_chunks, tiny_hf

from ringserve.engine.config import ModelConfig
from ringserve.engine.kv_cache import KVCache
from ringserve.engine.model import Llama
from ringserve.errors import FailedPrecondition
from ringserve.prefill_service.context_parallel import CPRunner, CPSequence
from ringserve.prefill_service.sharding import plan_pass
from ringserve.process_group import check_group

BLOCK = 8


def cp_passes(rank, world, config_dict, state, token_ids, passes, strategies):
    """Prefill ``token_ids`` in passes on this rank; return rank 0's logits and this rank's KV."""
    config = ModelConfig.from_hf(config_dict)
    model = Llama.from_state_dict(config, state) if state is not None else Llama.load(None, progress=False)
    check_group(model, world, torch.float32)
    cache = KVCache(model.config, num_blocks=64, block_size=BLOCK)
    runner = CPRunner(model, cache)
    seq = CPSequence()
    logits, positions, used = [], [], []
    start = 0
    for n, strategy in zip(passes, strategies):
        out = runner.prefill([seq], [token_ids[start : start + n]], strategy)
        logits.append(out[0] if out else None)
        positions += [start + i for i in plan_pass(n, world, BLOCK).rank_tokens(rank)]
        start += n
    kv = [cache.read(layer, seq.block_table, seq.num_cached_local) for layer in range(config.num_hidden_layers)]
    used.append(cache.allocator.num_used)
    cache.allocator.free(seq.block_table)
    used.append(cache.allocator.num_used)
    return logits, positions, torch.stack([torch.stack(x) for x in kv]), used, runner.last_strategy


def single_process_kv(model: Llama, ids: list[int]) -> torch.Tensor:
    cache = KVCache(model.config, num_blocks=64, block_size=BLOCK)
    table = cache.allocator.allocate(-(-len(ids) // BLOCK))
    from ringserve.engine.kv_cache import PagedAttention, SeqSpan

    with torch.inference_mode():
        model(torch.tensor(ids), torch.arange(len(ids)), PagedAttention(cache, [SeqSpan(0, len(ids), table, 0)]))
    kv = torch.stack(
        [torch.stack(cache.read(layer, table, len(ids))) for layer in range(model.config.num_hidden_layers)]
    )
    cache.allocator.free(table)
    return kv  # [layers, 2, T, Hkv, D]


def check_against_single(model, results, ids, passes, atol):
    ref_logits = run_chunks(model, ids, passes, block_size=BLOCK)
    ends = [sum(passes[: i + 1]) - 1 for i in range(len(passes))]
    rank0_logits = results[0][0]
    for got, end in zip(rank0_logits, ends):
        torch.testing.assert_close(got, ref_logits[end], atol=atol, rtol=atol)
    assert all(r[0] == [None] * len(passes) for r in results[1:]), "only the leader returns logits"
    # Gathered KV: every token's K and V, from whichever rank holds it, equals the single-process cache.
    ref_kv = single_process_kv(model, ids)
    seen = []
    for _, positions, kv, used, _ in results:
        seen += positions
        torch.testing.assert_close(kv, ref_kv[:, :, positions], atol=atol, rtol=atol)
        assert used[0] > 0 or not positions
        assert used[1] == 0, "blocks leaked"
    assert sorted(seen) == list(range(len(ids)))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_cp_forward_tiny_model(world):
    hf = tiny_hf(8, 2, False, seed=world)
    config = ModelConfig.from_hf(hf.config.to_dict())
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    model = Llama.from_state_dict(config, state)
    ids = torch.randint(0, 97, (123,), generator=torch.Generator().manual_seed(world)).tolist()
    passes = [37, 1, 50, 35]  # full prefill, then partial prefills over the persistent cache
    strategies = ["pass_kv", "pass_q", "pass_q", "auto"]
    results = values(run_ranks(world, cp_passes, hf.config.to_dict(), state, ids, passes, strategies))
    check_against_single(model, results, ids, passes, atol=1e-4)


def test_cp_forward_default_model(default_model):
    """SmolLM2-135M over 2 ranks: a prompt, then a follow-up pass over its cached KV."""
    model, tokenizer = default_model
    ids = tokenizer.encode("The capital of France is Paris. " * 20)[:90]
    assert len(ids) == 90
    passes = [61, 29]
    results = values(run_ranks(2, cp_passes, model.config.to_hf(), None, ids, passes, ["pass_kv", "pass_q"]))
    check_against_single(model, results, ids, passes, atol=1e-3)


def mismatched_group(rank, world, configured_world, kv_heads_by_rank):
    hf = tiny_hf(4, kv_heads_by_rank[rank], False)
    model = Llama.from_state_dict(ModelConfig.from_hf(hf.config.to_dict()), dict(hf.state_dict()))
    check_group(model, configured_world, torch.float32)


def test_group_size_mismatch_is_a_clear_error():
    results = run_ranks(2, mismatched_group, 3, [2, 2])
    for status, (name, message, _) in results:
        assert status == "error" and name == FailedPrecondition.__name__
        assert "2 ranks but 3 were configured" in message


def test_head_count_mismatch_is_a_clear_error():
    results = run_ranks(2, mismatched_group, 2, [2, 4])
    for status, (name, message, _) in results:
        assert status == "error" and name == FailedPrecondition.__name__
        assert "disagree" in message and "same model" in message


def never_called(rank, world):
    raise AssertionError("the group must not form")


def test_rank_that_never_joins_fails_in_bounded_time():
    t0 = time.monotonic()
    [(status, (name, message, _))] = run_ranks(2, never_called, join=1, timeout_s=3)
    assert status == "error" and name == "Unavailable"
    assert "could not form a group of 2" in message
    assert time.monotonic() - t0 < 60


def dies_mid_pass(rank, world, config_dict, state):
    model = Llama.from_state_dict(ModelConfig.from_hf(config_dict), state)
    if rank == 1:
        os._exit(1)  # a crashed rank: no goodbye
    runner = CPRunner(model, KVCache(model.config, num_blocks=8, block_size=BLOCK))
    seq = CPSequence()
    try:
        runner.prefill([seq], [list(range(20))], "pass_kv")
    finally:
        runner.cache.allocator.free(seq.block_table)
        assert runner.cache.allocator.num_used == 0


def test_rank_that_dies_fails_in_bounded_time():
    hf = tiny_hf(4, 2, False)
    t0 = time.monotonic()
    results = run_ranks(2, dies_mid_pass, hf.config.to_dict(), dict(hf.state_dict()), timeout_s=5, wait_s=60)
    status, (name, message, _) = results[0]
    assert status == "error" and name == "Unavailable", (name, message)
    assert "rank" in message
    assert time.monotonic() - t0 < 60
