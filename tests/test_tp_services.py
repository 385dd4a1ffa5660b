"""Tensor parallelism inside the service groups, end to end: real prefill (TP x CP) and decode
(TP x KVP) groups of processes over gloo, the router in front (or `ringserve up --tp`), on a small
random GQA checkpoint (conftest's ``gqa_dir``: 4 query heads, 2 KV heads, so TP 2 splits both and
TP 4 replicates the KV heads). Greedy float32 tokens through the router equal the single-process
engine's on the same weights, for full, chunked and cached prefills, and every KV block is free
afterwards."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_services import prefill_info, wait_blocks_free
from test_supervision import assert_none_left, start_up, wait_for_line

from ringserve import rpc
from ringserve.client import Client
from ringserve.config import DecodeConfig, RedisArgs
from ringserve.decode_service.group import DecodeGroup
from ringserve.decode_service.protocol import RowsLanded
from ringserve.decode_service.worker import DecodeWorker
from ringserve.engine.engine import Engine
from ringserve.engine.model import Llama
from ringserve.engine.sampling import SamplingParams
from ringserve.engine.tokenizer import Tokenizer
from ringserve.launch import start_cluster
from ringserve.registry import Registry, connect
from ringserve.v1 import decode_pb2, decode_pb2_grpc

PROMPTS = ["The capital of France is", "Once upon a time " * 40]  # 160 tokens: every CP / KVP rank gets rows
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference(gqa_dir):
    engine = Engine(Llama.load(gqa_dir, progress=False), Tokenizer.from_checkpoint(gqa_dir))
    params = SamplingParams(max_tokens=MAX_TOKENS)
    return {p: [e.token_id for e in engine.generate(engine.tokenizer.encode(p), params)] for p in PROMPTS}


# Prefill in KV blocks of 16 and passes of at most 64 tokens: the long prompt takes several chunks
# (each a partial prefill over the KV of the earlier ones), and its second request reads all but its
# last block from the prefix cache.
PREFILL_FLAGS = ["--block-size", "16", "--max-pass-tokens", "64"]
LONG = PROMPTS[1]


def check_tokens(router: str, reference: dict, log: Path) -> None:
    """Every prompt's greedy tokens through the router equal the engine's; the long prompt was
    prefilled in chunks (the leader's log says how many passes), then again from the prefix cache."""
    with Client(router, timeout=180) as c:
        usage = []
        for prompt in [*PROMPTS, LONG]:
            chunks = list(c.generate(prompt, max_tokens=MAX_TOKENS))
            assert [t for ch in chunks for t in ch.token_ids] == reference[prompt], prompt
            usage.append(chunks[-1].usage)
    n = usage[1].prompt_tokens
    assert usage[1].cached_prompt_tokens == 0 and usage[2].cached_prompt_tokens == (n - 1) // 16 * 16 > 0
    passes = [int(m) for m in re.findall(rf"prefilled tokens={n} cached_tokens=0 .*passes=(\d+)", log.read_text())]
    assert passes and passes[0] >= n // 64, passes


@pytest.mark.parametrize(
    "prefill,decode,transport",
    [((4, 1), (4, 1), "auto"), ((2, 2), (2, 2), "tcp"), ((1, 3), (2, 1), "auto")],
    ids=["tp4cp1-to-tp4kvp1-nixl", "tp2cp2-to-tp2kvp2-tcp", "tp1cp3-to-tp2kvp1-nixl"],
)
def test_greedy_tokens_through_tp_groups_match_single_process(
    gqa_dir, reference, redis_server, tmp_path, prefill, decode, transport
):
    """(TP, CP) prefill -> (TP', KVP') decode, TP 4 replicating the 2 KV heads on both tiers: the
    layouts show in GetInfo and the registry, the tokens of full, chunked and cached prefills are
    the engine's, and both tiers hold no KV block beyond the prefix cache once the requests are done."""
    (ptp, cp), (dtp, kvp) = prefill, decode
    cluster = start_cluster(
        cp=cp,
        kvp=kvp,
        model=str(gqa_dir),
        log_dir=str(tmp_path),
        redis_url=redis_server.url,
        extra={
            "prefill": ["--tp", str(ptp), "--kv-transfer", transport, *PREFILL_FLAGS],
            "decode": ["--tp", str(dtp), "--shard-tokens", "32", "--kv-transfer", transport],
            "router": [],
        },
    )
    try:
        info = prefill_info(cluster)
        assert (info.tp_size, info.cp_size, info.model.num_key_value_heads) == (ptp, cp, 2)
        with rpc.channel(cluster.decode) as dc:
            dinfo = decode_pb2_grpc.DecodeStub(dc).GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=10)
        assert (dinfo.tp_size, dinfo.kvp_size, dinfo.model.num_attention_heads) == (dtp, kvp, 4)
        registry = Registry(connect(RedisArgs(redis_url=redis_server.url)), cluster.name)
        assert {(g.role, g.tp, g.degree) for g in registry.groups()} == {("prefill", ptp, cp), ("decode", dtp, kvp)}
        check_tokens(cluster.router, reference, tmp_path / "prefill.log")
        wait_blocks_free(cluster)
    finally:
        cluster.stop()


def test_up_with_tp_2_serves_the_engines_tokens_and_stops_cleanly(gqa_dir, reference, tmp_path):
    """`ringserve up --tp 2`: TP 2 x CP 1 prefill and TP 2 x KVP 1 decode groups (four ranks) behind
    its router; SIGTERM drains and stops everything it started."""
    proc, log, mark = start_up(
        tmp_path, "--tp", "2", "--cp", "1", "--model", str(gqa_dir), "--prefill-args", " ".join(PREFILL_FLAGS)
    )
    try:
        wait_for_line(proc, log, "ringserve is up", timeout_s=400)
        check_tokens(proc.stdout.readline().strip(), reference, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    assert_none_left(mark)


@pytest.mark.parametrize("service,size_flag", [("decode", "--kvp"), ("prefill", "--cp")])
def test_tp_that_does_not_split_the_heads_fails_at_start_with_a_clear_message(gqa_dir, service, size_flag):
    """4 query heads do not split over 3 TP ranks: the group refuses before reading any weight."""
    proc = subprocess.run(
        [sys.executable, "-m", "ringserve.cli", service, "--port", "0", "--model", str(gqa_dir), "--tp", "3"]
        + [size_flag, "1", "--kv-transfer", "tcp", "--group-timeout-s", "60"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "--tp 3 cannot shard this model" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_tp_decode_share_lands_only_when_every_tp_rank_has_its_heads(gqa_dir):
    """A TP 2 decode group answers one target per TP rank with its KV head, and counts a prompt
    row landed once both TP ranks hold theirs; a piece naming a head the rank does not hold counts
    nothing."""
    cfg = DecodeConfig(model=str(gqa_dir), tp=2, kv_blocks=16, block_size=16, kv_transfer="tcp")
    worker = DecodeWorker(DecodeGroup(cfg), Tokenizer.from_checkpoint(gqa_dir), reservation_ttl_s=60.0)
    try:
        res = worker.reserve("r", 20, 4)
        assert [(t[0], t[2], t[3], t[5], t[6]) for t in res.targets] == [(0, 0, 20, 0, 1), (1, 0, 20, 1, 1)]
        worker._landed(RowsLanded(0, "r", res.epoch, "0.0.0", 0, 20))
        assert worker.requests["r"].landed == 0  # TP rank 1's head is still missing
        worker._landed(RowsLanded(1, "r", res.epoch, "0.1.0", 0, 8, range(1, 2)))  # it holds one head: 0
        assert worker.requests["r"].landed == 0 and worker.dropped["outside_share"] == 1
        worker._landed(RowsLanded(1, "r", res.epoch, "0.1.0", 0, 20))
        assert worker.requests["r"].landed == 20
        assert worker.cancel("r")
        deadline = time.monotonic() + 30
        while worker.blocks_used and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.blocks_used == 0
    finally:
        worker.close()
