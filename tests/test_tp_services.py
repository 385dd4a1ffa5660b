"""Tensor parallelism inside the service groups, end to end: real prefill (TP x CP) and decode
(TP x KVP) groups of processes over gloo, the router in front, on a small random GQA checkpoint
(4 query heads, 2 KV heads: TP 2 splits both). Greedy float32 tokens through the router equal the
single-process engine's on the same weights, and every KV block is free afterwards."""

import shutil
import subprocess
import sys
import time

import pytest
import torch
from test_services import prefill_info, wait_blocks_free
from transformers import LlamaConfig, LlamaForCausalLM

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
from ringserve.engine.weights import gguf_cache_dir
from ringserve.launch import start_cluster
from ringserve.registry import Registry, connect
from ringserve.v1 import decode_pb2, decode_pb2_grpc

PROMPTS = ["The capital of France is", "Once upon a time " * 40]  # 160 tokens: every CP / KVP rank gets rows
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory, default_gguf):
    """A random Llama with grouped KV heads and the default model's tokenizer (so the router can
    tokenize text for it)."""
    path = tmp_path_factory.mktemp("gqa")
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        initializer_range=0.2,  # decisive logits: greedy tokens far from ties
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)
    Tokenizer.from_checkpoint(default_gguf)  # writes the GGUF's tokenizer files
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gguf_cache_dir(default_gguf) / name, path / name)
    return path


@pytest.fixture(scope="module")
def reference(gqa_dir):
    engine = Engine(Llama.load(gqa_dir, progress=False), Tokenizer.from_checkpoint(gqa_dir))
    params = SamplingParams(max_tokens=MAX_TOKENS)
    return {p: [e.token_id for e in engine.generate(engine.tokenizer.encode(p), params)] for p in PROMPTS}


@pytest.mark.parametrize(
    "prefill,decode,transport",
    [((2, 1), (2, 1), "auto"), ((2, 2), (2, 2), "tcp"), ((1, 3), (2, 1), "auto")],
    ids=["tp2cp1-to-tp2kvp1-nixl", "tp2cp2-to-tp2kvp2-tcp", "tp1cp3-to-tp2kvp1-nixl"],
)
def test_greedy_tokens_through_tp_groups_match_single_process(
    gqa_dir, reference, redis_server, tmp_path, prefill, decode, transport
):
    """(TP, CP) prefill -> (TP', KVP') decode: the layouts show in GetInfo and the registry, the
    tokens are the engine's, and both tiers hold no KV block once the requests are done."""
    (ptp, cp), (dtp, kvp) = prefill, decode
    flags = ["--kv-transfer", transport, "--prefix-cache", "0"]
    cluster = start_cluster(
        cp=cp,
        kvp=kvp,
        model=str(gqa_dir),
        log_dir=str(tmp_path),
        redis_url=redis_server.url,
        extra={
            "prefill": ["--tp", str(ptp), *flags],
            "decode": ["--tp", str(dtp), "--shard-tokens", "32", *flags[:2]],
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
        with Client(cluster.router, timeout=180) as c:
            for prompt in PROMPTS:
                chunks = list(c.generate(prompt, max_tokens=MAX_TOKENS))
                assert [t for ch in chunks for t in ch.token_ids] == reference[prompt], prompt
        wait_blocks_free(cluster)
    finally:
        cluster.stop()


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
