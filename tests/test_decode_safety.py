"""The decode worker and servicer on bad input and bad luck (issue 16: defects 2, 4, 8, 15)."""

import queue
import time

import grpc
import pytest
import torch
from test_decode_worker import drain, make_worker, prompt_kv_and_first_token, push

from ringserve.engine.engine import Engine
from ringserve.engine.sampling import SamplingParams
from ringserve.errors import RingserveError


def start_with_kv(worker, rid, ids, kv, first, params):
    push(worker.reserve(rid, len(ids), params.max_tokens), rid, kv)
    return worker.start(rid, ids, first, params)


def test_nan_logits_fail_one_request_alone(default_model):
    """A request whose prompt KV is NaN (a corrupt transfer) gets NaN logits in its row of the
    batch: it ends with an error, the others in the same batch finish with the engine's tokens."""
    model, tokenizer = default_model
    worker = make_worker(model, tokenizer)
    try:
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        good = []
        for i, prompt in enumerate(["The capital of France is", "1, 2, 3,"]):
            ids = tokenizer.encode(prompt)
            kv, first = prompt_kv_and_first_token(model, ids)
            good.append((ids, start_with_kv(worker, f"g{i}", ids, kv, first, params)))
        ids = tokenizer.encode("Poisoned prompt")
        kv, first = prompt_kv_and_first_token(model, ids)
        bad = start_with_kv(
            worker, "bad", ids, torch.full_like(kv, float("nan")), first, SamplingParams(max_tokens=12, temperature=1.0)
        )
        with pytest.raises(RingserveError, match="not finite"):
            drain(bad, timeout=60)
        engine = Engine(model, tokenizer)
        for ids, req in good:
            assert [e.token_id for e in drain(req, timeout=60)] == [e.token_id for e in engine.generate(ids, params)]
        assert worker.blocks_used == 0
    finally:
        worker.close()


@pytest.fixture
def decode_service(default_model):
    """A real DecodeServicer over gRPC on loopback, with its worker (one rank, 64 blocks of 16)."""
    from ringserve.decode_service.server import DecodeServicer
    from ringserve.rpc import model_description, start_server
    from ringserve.v1 import decode_pb2_grpc

    model, tokenizer = default_model
    worker = make_worker(model, tokenizer)
    servicer = DecodeServicer(worker, model_description(model, 16, "test"))
    server, port, _ = start_server(
        [(decode_pb2_grpc.add_DecodeServicer_to_server, servicer)], ["ringserve.v1.Decode"], "127.0.0.1", 0
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield worker, decode_pb2_grpc.DecodeStub(channel)
    finally:
        channel.close()
        server.stop(0)
        worker.close()


def test_decode_that_fails_to_start_frees_its_reservation(decode_service, default_model):
    from ringserve.v1 import common_pb2, decode_pb2

    worker, stub = decode_service
    model, tokenizer = default_model
    ids = tokenizer.encode("The capital of France is")
    kv, first = prompt_kv_and_first_token(model, ids)
    for rid, sampling in [("bad-top-p", common_pb2.SamplingParams(top_p=2.0)), ("bad-stop", common_pb2.SamplingParams(stop_token_ids=[10**6]))]:
        resp = stub.Reserve(decode_pb2.ReserveRequest(request_id=rid, prompt_tokens=len(ids), max_tokens=8))
        push([(t.rank, t.address, t.first_position, t.num_tokens, b"") for t in resp.targets], rid, kv)
        assert worker.blocks_used > 0
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Decode(decode_pb2.DecodeRequest(request_id=rid, prompt_token_ids=ids, first_token=first, sampling=sampling), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert worker.blocks_used == 0, rid


def test_a_huge_budget_does_not_pin_blocks(default_model):
    model, tokenizer = default_model
    worker = make_worker(model, tokenizer, kv_blocks=64)  # 1024 tokens of KV
    try:
        worker.reserve("hog", 10, 4000)
        assert worker.blocks_used <= 2  # the prompt's block and a bounded headroom, not 63 blocks
        worker.reserve("other", 500, 100)
        assert worker.cancel("hog") and worker.cancel("other")
        assert worker.blocks_used == 0
    finally:
        worker.close()
