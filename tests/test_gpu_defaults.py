"""Defaults a new user gets without flags: --device auto, --dtype auto, a KV pool sized from GPU
memory, and `ringserve up` passing each service's flags through. CPU behaviour stays as it was."""

import argparse
import signal

import pytest
import torch

from ringserve.config import DecodeConfig, PrefillConfig
from ringserve.engine.config import ModelConfig
from ringserve.errors import FailedPrecondition, InvalidArgument
from ringserve.gpu_memory import (
    BASE_RESERVE_BYTES,
    GIB,
    PoolRequest,
    block_bytes,
    kv_pool_blocks,
    pool_request,
    resolve_device,
    resolve_dtype,
    weight_bytes,
    working_bytes,
)
from ringserve.supervise import _check_passed, service_flags
from tests.test_supervision import assert_none_left, start_up, wait_for_line

LLAMA3_8B = ModelConfig.from_hf(
    dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    )
)


def test_auto_device_and_dtype_resolve_for_this_machine():
    assert not torch.cuda.is_available()  # CI and this machine: CPU only
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:3") == "bfloat16"
    assert resolve_dtype("float16", "cuda") == "float16"


def test_cpu_configs_keep_their_defaults():
    d, p = DecodeConfig(), PrefillConfig()
    assert (d.device, d.dtype, d.kv_blocks) == ("cpu", "float32", 512)
    assert (p.device, p.dtype, p.kv_blocks) == ("cpu", "float32", 256)
    assert DecodeConfig(kv_blocks=7, dtype="bfloat16").kv_blocks == 7  # explicit values win


def test_model_sizes_match_the_published_8b_count():
    assert weight_bytes(LLAMA3_8B, 2) == 2 * 8_030_261_248  # Llama-3-8B's parameter count
    assert block_bytes(LLAMA3_8B, 64, 2) == 64 * 131_072  # 128 KiB of KV per token in bf16


def _request(min_blocks: int = 1024) -> PoolRequest:
    work = working_bytes(LLAMA3_8B, 65536, 2, 16)
    return PoolRequest(weight_bytes(LLAMA3_8B, 2), work, block_bytes(LLAMA3_8B, 64, 2), min_blocks)


def test_a_tp_rank_sizes_its_pool_for_its_shard_and_its_kv_heads():
    assert pool_request(LLAMA3_8B, 2, 64, 65536, 16, 1024) == _request()
    one, two, sixteen = (pool_request(LLAMA3_8B, 2, 64, 65536, 16, 1024, tp) for tp in (1, 2, 16))
    assert two.weight_bytes == one.weight_bytes // 2 and two.block_bytes == one.block_bytes // 2  # 4 of 8 KV heads
    assert sixteen.block_bytes == one.block_bytes // 8  # 16 ranks share 8 KV heads: one each, replicated
    assert one.working_bytes == two.working_bytes


def test_pool_takes_what_the_fraction_leaves_after_weights_and_working_memory():
    req, total = _request(), 143 * GIB
    for fraction in (0.36, 0.54, 0.9):
        blocks = kv_pool_blocks(req, total, free_bytes=total, fraction=fraction, what="test")
        fixed = req.weight_bytes + req.working_bytes + BASE_RESERVE_BYTES
        assert fixed + blocks * req.block_bytes <= fraction * total < fixed + (blocks + 1) * req.block_bytes
    # The share of the total, not of what is free: the same pool whichever tier started first.
    assert kv_pool_blocks(req, total, 100 * GIB, 0.54, "a") == kv_pool_blocks(req, total, total, 0.54, "b")


def test_pool_errors_say_what_does_not_fit():
    req = _request()
    with pytest.raises(FailedPrecondition, match="--gpu-memory-fraction 0.9 of this GPU's 24.0 GiB"):
        kv_pool_blocks(req, 24 * GIB, 24 * GIB, 0.9, "decode")  # 16 GB of weights + a pass's activations
    with pytest.raises(FailedPrecondition, match="only 40.0 GiB is free"):
        kv_pool_blocks(req, 143 * GIB, 40 * GIB, 0.9, "decode")
    with pytest.raises(InvalidArgument, match="in \\(0, 1\\]"):
        kv_pool_blocks(req, 143 * GIB, 143 * GIB, 0.0, "decode")


def test_up_splits_the_gpu_and_passes_service_flags_last():
    args = argparse.Namespace(device="auto", load_format="dummy", gpu_memory_fraction=0.9,
                              prefill_args="--target-pass-s 0.5", decode_args="--gpu-memory-fraction 0.5",
                              router_args="--policy least_loaded")  # fmt: skip
    flags = service_flags(args)
    assert flags["prefill"] == ["--device", "auto", "--load-format", "dummy", "--gpu-memory-fraction", "0.36",
                                "--target-pass-s", "0.5"]  # fmt: skip
    assert flags["decode"][-4:] == ["--gpu-memory-fraction", "0.54", "--gpu-memory-fraction", "0.5"]  # the user's wins
    assert flags["router"] == ["--policy", "least_loaded"]


def test_up_checks_passed_flags_with_the_services_parser():
    _check_passed("decode", "--max-batch 128 --kv-transfer tcp")
    with pytest.raises(InvalidArgument, match="has no flag --nope"):
        _check_passed("prefill", "--nope 1")
    with pytest.raises(InvalidArgument, match="invalid int value"):
        _check_passed("decode", "--max-batch many")
    with pytest.raises(InvalidArgument, match="--port is set by `up` itself"):
        _check_passed("router", "--port 1")


def test_up_starts_each_service_with_its_passed_flags(tmp_path):
    proc, log, mark = start_up(tmp_path, "--cp", "1", "--decode-args", "--max-batch 7", "--prefill-args",
                               "--target-pass-s 0.5")  # fmt: skip
    try:
        decode = wait_for_line(proc, log, "started decode (pid", timeout_s=120)
        prefill = wait_for_line(proc, log, "started prefill (pid", timeout_s=120)
        assert "--device auto" in decode and "--max-batch 7" in decode and "--gpu-memory-fraction 0.54" in decode
        assert "--target-pass-s 0.5" in prefill and "--gpu-memory-fraction 0.36" in prefill
        assert "--dtype auto" in prefill
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert_none_left(mark)
