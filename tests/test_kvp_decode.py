"""KV-parallel decode: sharded attention merges to the unsharded result, and KVP groups of real
processes (gloo) generate exactly what a single worker does, fail cleanly, and leak nothing."""

import os
import random
import subprocess
import sys
import time

import pytest
import torch
from multiproc import run_ranks, values
from test_decode_worker import NixlSender, drain, prompt_kv_and_first_token, push
from test_model import ours_from, tiny_hf

from ringserve.config import DecodeConfig
from ringserve.decode_service.group import DecodeGroup
from ringserve.decode_service.kvp import gather_and_merge
from ringserve.decode_service.worker import DecodeWorker
from ringserve.engine import paged_decode
from ringserve.engine.attention import attend, merge
from ringserve.engine.config import ModelConfig
from ringserve.engine.engine import Engine
from ringserve.engine.kv_cache import KVCache
from ringserve.engine.sampling import SamplingParams
from ringserve.errors import ResourceExhausted, Unavailable

# --- the attention pieces -----------------------------------------------------------------------


def sharded_attention_cases(rank, world, lengths, cases):
    return [sharded_attention(rank, world, lengths, heads, kv_heads, seed) for heads, kv_heads, seed in cases]


def sharded_attention(rank, world, lengths, heads, kv_heads, seed):
    """Every rank holds a random share of each sequence's keys (any split: KV is a set), attends
    its share, and the group merges; returns the merged output and the full q/k/v for checking."""
    g = torch.Generator().manual_seed(seed)
    d, block = 16, 4
    q = torch.randn(len(lengths), heads, d, generator=g)
    keys = [torch.randn(n, kv_heads, d, generator=g) for n in lengths]
    values_ = [torch.randn(n, kv_heads, d, generator=g) for n in lengths]
    owner = [torch.randint(0, world, (n,), generator=g) for n in lengths]  # rank of each row
    cfg = ModelConfig.from_hf(
        dict(
            vocab_size=8,
            hidden_size=heads * d,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=512,
        )
    )
    cache = KVCache(cfg, num_blocks=64, block_size=block)
    tables, mine = [], []
    for b in range(len(lengths)):
        rows = (owner[b] == rank).nonzero().flatten()
        table = cache.allocator.allocate(-(-len(rows) // block))
        cache.write(0, cache.slots(table, 0, len(rows)), keys[b][rows], values_[b][rows])
        tables.append(table + [0] * (32 - len(table)))
        mine.append(len(rows))
    batch = paged_decode.DecodeBatch.build(torch.tensor(tables, dtype=torch.int32), mine)
    out, lse = paged_decode.decode_attention(cache, 0, q, batch)
    merged = gather_and_merge(out, lse) if world > 1 else out
    return merged, q, keys, values_


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_decode_attention_equals_unsharded(world):
    lengths = [1, 7, 0, 33, 64]  # a sequence with no keys anywhere gets zeros
    cases = [(4, 4, world), (4, 2, world + 10), (6, 1, world + 20)]  # MHA, GQA, MQA
    per_rank = values(run_ranks(world, sharded_attention_cases, lengths, cases))
    for case in range(len(cases)):
        results = [r[case] for r in per_rank]
        merged, q, keys, vals = results[0]
        for b in range(len(lengths)):
            ref = attend(q[b : b + 1], keys[b], vals[b], causal=False)[0][0]
            torch.testing.assert_close(merged[b], ref, atol=1e-5, rtol=1e-5)
        for other in results[1:]:  # every rank merges in the same order: identical outputs
            assert torch.equal(other[0], merged)


def check_paged_decode_kernel() -> None:
    """The Triton kernel against ``attend``: block walk, splits, GQA tile, empty sequences."""
    assert paged_decode.use_kernel(torch.zeros(1, 1, 1, dtype=torch.half)), "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    for kv_heads, heads, block, splits in [(2, 6, 16, 3), (1, 8, 16, 1), (4, 4, 32, 5)]:
        k = torch.randn(40, block, kv_heads, 32).half()
        v = torch.randn(40, block, kv_heads, 32).half()
        q = torch.randn(4, heads, 32).half()
        lengths = [1, 0, 5 * block + 3, 3 * block]
        tables = torch.stack([torch.randperm(40)[:8] for _ in lengths]).int()
        out, lse = paged_decode.paged_decode_kernel(
            q, k, v, tables, torch.tensor(lengths, dtype=torch.int32), splits
        )
        for b, n in enumerate(lengths):
            rows = tables[b].long()
            kk, vv = k[rows].flatten(0, 1)[:n].float(), v[rows].flatten(0, 1)[:n].float()
            ref_out, ref_lse = attend(q[b : b + 1].float(), kk, vv, causal=False)
            torch.testing.assert_close(out[b].float(), ref_out[0], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(lse[b], ref_lse[0], atol=1e-3, rtol=1e-3)


def check_merge_partials_kernel() -> None:
    """The Triton merge of R partials against folding ``merge``, empty partials and rows included."""
    torch.manual_seed(1)
    out = torch.randn(5, 7, 32)
    lse = torch.randn(5, 7)
    lse[1, 3] = lse[4] = float("-inf")  # one empty partial; a row with no keys at all
    got_out, got_lse = paged_decode.merge_partials(out, lse)
    ref_out, ref_lse = out[:, 0], lse[:, 0]
    for r in range(1, 7):
        ref_out, ref_lse = merge(ref_out, ref_lse, out[:, r], lse[:, r])
    torch.testing.assert_close(got_out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, ref_lse)


def test_triton_paged_decode_kernel_matches_attend():
    """The GPU kernel's logic, run on this CPU by Triton's interpreter in float16 (it has no
    bfloat16). The interpreter must be on before triton is first imported: a fresh process."""
    pytest.importorskip("triton")
    code = (
        "import test_kvp_decode as t; t.check_paged_decode_kernel(); t.check_merge_partials_kernel(); "
        "print('kernel ok')"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=os.path.dirname(__file__),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "kernel ok" in proc.stdout, proc.stderr[-3000:]


# --- whole groups -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama (GQA 4:2) saved as an HF checkpoint the group's child ranks load."""
    hf = tiny_hf(heads=4, kv_heads=2, tied=False, seed=3)
    path = tmp_path_factory.mktemp("tiny-kvp")
    hf.save_pretrained(path)
    return str(path), ours_from(hf)


def start_group(
    model, model_path, kvp, kv_blocks=64, shard_tokens=16, tokenizer=None, kv_transfer="tcp", **kw
) -> DecodeWorker:
    cfg = DecodeConfig(
        model=model_path, kvp=kvp, kv_blocks=kv_blocks, block_size=8, group_timeout_s=90, kv_transfer=kv_transfer
    )
    return DecodeWorker(DecodeGroup(cfg, model=model), tokenizer, shard_tokens=shard_tokens, **kw)


def run_mixed_batch(worker, model, lengths, max_tokens, seed, nixl=None):
    """Requests of very different lengths join a running batch one by one (and leave as they
    finish); returns each one's tokens and the engine's for the same prompt."""
    rnd = random.Random(seed)
    engine = Engine(model, worker.tokenizer)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    reqs = []
    for i, n in enumerate(lengths):
        ids = [rnd.randrange(model.config.vocab_size) for _ in range(n)]
        kv, first = prompt_kv_and_first_token(model, ids)
        res = worker.reserve(f"r{i}", n, max_tokens)
        push(res, f"r{i}", kv, nixl)
        reqs.append((ids, res.targets, worker.start(f"r{i}", len(ids), first, params)))
        time.sleep(0.05 * rnd.random())
    out = []
    for ids, targets, req in reqs:
        got = [e.token_id for e in drain(req)]
        expected = [e.token_id for e in engine.generate(ids, params)]
        out.append((len({t[0] for t in targets}), got, expected))
    return out


@pytest.mark.parametrize("kvp,transport", [(1, "tcp"), (2, "nixl"), (3, "tcp"), (4, "nixl")])
def test_kvp_group_generates_what_one_worker_does(kvp, transport, tiny_checkpoint, default_model):
    """Prompt KV arrives over TCP, or by NIXL WRITEs straight into each rank's blocks."""
    path, model = tiny_checkpoint
    worker = start_group(model, path, kvp, tokenizer=default_model[1], kv_transfer=transport)
    nixl = NixlSender(model.config, block_size=8) if transport == "nixl" else None
    try:
        # 3 and 5 tokens stay on one rank; 40, 90 and 150 spread over up to kvp ranks (16 per rank).
        results = run_mixed_batch(worker, model, [40, 3, 150, 5, 90], max_tokens=30, seed=kvp, nixl=nixl)
        for _, got, expected in results:
            assert got == expected
        assert max(r[0] for r in results) == min(kvp, 4)
        assert worker.blocks_used == 0
    finally:
        worker.close()
        if nixl is not None:
            nixl.close()


def test_kvp_default_model_long_generation(default_model, default_gguf):
    model, tokenizer = default_model
    worker = start_group(model, default_gguf, 2, kv_blocks=64, shard_tokens=8, tokenizer=tokenizer)
    engine = Engine(model, tokenizer)
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    try:
        reqs = []
        for i, prompt in enumerate(["The capital of France is", "Write a long story about a dragon."]):
            ids = tokenizer.encode(prompt)
            kv, first = prompt_kv_and_first_token(model, ids)
            res = worker.reserve(f"d{i}", len(ids), 64)
            assert [t[0] for t in res.targets] == [0, 1]
            push(res, f"d{i}", kv)
            reqs.append((ids, worker.start(f"d{i}", len(ids), first, params)))
        for ids, req in reqs:
            assert [e.token_id for e in drain(req)] == [e.token_id for e in engine.generate(ids, params)]
        assert worker.blocks_used == 0
    finally:
        worker.close()


def test_admission_is_all_or_nothing(tiny_checkpoint, default_model):
    path, model = tiny_checkpoint
    worker = start_group(model, path, 2, kv_blocks=4, shard_tokens=16, tokenizer=default_model[1])
    try:
        assert worker.admissible_blocks() == 8  # 4 free on each of 2 ranks: one request can take 8
        worker.reserve("small", 20, 4)  # 23 rows on two ranks: 2 blocks each
        # 2 free on each rank, 1 of them kept for small's growth: a new request gets 1 per rank.
        assert worker.admissible_blocks() == 2 and worker.blocks_free == 4
        before = [a.num_free for a in worker.allocators]
        with pytest.raises(ResourceExhausted, match="KV cache full"):
            worker.reserve("big", 40, 10)  # needs 4 blocks on each rank, 2 free on each
        assert [a.num_free for a in worker.allocators] == before
        assert worker.cancel("small")
        assert worker.blocks_used == 0
    finally:
        worker.close()


def test_a_dying_rank_ends_the_groups_requests_promptly(tiny_checkpoint, default_model):
    path, model = tiny_checkpoint
    worker = start_group(model, path, 2, tokenizer=default_model[1])
    try:
        ids = list(range(1, 60))
        kv, first = prompt_kv_and_first_token(model, ids)
        push(worker.reserve("long", len(ids), 150), "long", kv)
        req = worker.start("long", len(ids), first, SamplingParams(max_tokens=150, ignore_eos=True))
        req.events.get(timeout=30)
        worker.reserve("waiting", 10, 5)  # reserved, never started: ends too
        worker.group.procs[0].kill()
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="decode group failed"):
            drain(req, timeout=20)
        assert time.monotonic() - t0 < 10
        assert worker.blocks_used == 0 and not worker.requests
        with pytest.raises(Unavailable, match="broken"):
            worker.reserve("after", 10, 5)
    finally:
        worker.close()


def test_a_broken_decode_service_leaves_the_registry_and_exits(redis_server, tmp_path):
    """The service as Kubernetes (or `ringserve up`) runs it: a decode group of 2 whose child rank
    is killed leaves the registry at once, fails liveness and exits, so a fresh one is started."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ringserve.config import RedisArgs
    from ringserve.process_group import free_port
    from ringserve.registry import Registry, connect
    from ringserve.rpc import LIVE

    port = free_port()
    argv = ["decode", "--kvp", "2", "--kv-transfer", "tcp", "--port", str(port), "--redis-url", redis_server.url]
    argv += ["--registry-ttl-s", "600", "--heartbeat-s", "0.25"]
    log = open(tmp_path / "decode.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ringserve.cli", *argv, "--cluster", "broken-decode"], stderr=log)
    registry = Registry(connect(RedisArgs(redis_url=redis_server.url)), "broken-decode")
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                try:
                    live = health.Check(health_pb2.HealthCheckRequest(service=LIVE), timeout=5).status
                    if live == health_pb2.HealthCheckResponse.SERVING and registry.groups():
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "decode.log").read_text()
                time.sleep(0.2)
        children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        # Rank 1 is the spawned child that is not multiprocessing's resource tracker.
        rank1 = [c for c in children if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        assert len(rank1) == 1, children
        os.kill(int(rank1[0]), 9)
        killed = time.monotonic()
        while [g for g in registry.groups() if g.address == address]:
            assert time.monotonic() - killed < 10, "a broken group leaves the registry at once (its TTL is 600 s)"
            time.sleep(0.1)
        assert proc.wait(timeout=60) == 0, "the broken group's process exits"
        assert "leaving the registry and exiting" in (tmp_path / "decode.log").read_text()
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)
        log.close()
