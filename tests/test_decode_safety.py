"""The decode worker and servicer on bad input and bad luck (issue 16: defects 2, 4, 8, 15)."""

import grpc
import pytest
import torch
from test_decode_worker import drain, make_worker, prompt_kv_and_first_token, push

from ringserve.decode_service.reservations import Reservation
from ringserve.engine.engine import Engine
from ringserve.engine.sampling import SamplingParams
from ringserve.errors import ResourceExhausted, RingserveError, Unavailable


def start_with_kv(worker, rid, ids, kv, first, params):
    push(worker.reserve(rid, len(ids), params.max_tokens), rid, kv)
    return worker.start(rid, len(ids), first, params)


@pytest.mark.parametrize("overlap", [False, True])
def test_nan_logits_fail_one_request_alone(default_model, overlap):
    """A request whose prompt KV is NaN (a corrupt transfer) gets NaN logits in its row of the
    batch: it ends with an error, the others in the same batch finish with the engine's tokens
    (with steps overlapped too: the bad request is in the next step when its NaN is seen)."""
    model, tokenizer = default_model
    worker = make_worker(model, tokenizer, overlap=overlap)
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
def decode_service(default_model, security):
    """A real DecodeServicer over gRPC on loopback, with its worker (one rank, 64 blocks of 16); in the
    secure mode on mutual TLS, called with a router's certificate."""
    from ringserve import rpc
    from ringserve.config import DecodeConfig
    from ringserve.decode_service.server import DecodeServicer
    from ringserve.v1 import decode_pb2_grpc

    model, tokenizer = default_model
    worker = make_worker(model, tokenizer)
    servicer = DecodeServicer(worker, rpc.model_description(model, 16, "test"))
    cfg = security.config(DecodeConfig(), "decode-safety", "decode")
    server, port, _ = rpc.start_server(
        [(decode_pb2_grpc.add_DecodeServicer_to_server, servicer)], ["ringserve.v1.Decode"], "127.0.0.1", 0, limits=cfg
    )
    channel = rpc.channel(f"127.0.0.1:{port}", tls=security.tls("decode-safety"))
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
    cases = [
        ("bad-top-p", dict(sampling=common_pb2.SamplingParams(top_p=2.0))),
        ("bad-stop-id", dict(sampling=common_pb2.SamplingParams(stop_token_ids=[10**6]))),
        ("bad-length", dict(prompt_tokens=len(ids) + 1)),
        ("huge-budget", dict(sampling=common_pb2.SamplingParams(max_tokens=10**9))),
    ]
    for rid, fields in cases:
        resp = stub.Reserve(decode_pb2.ReserveRequest(request_id=rid, prompt_tokens=len(ids), max_tokens=8))
        targets = [(t.rank, t.address, t.first_position, t.num_tokens, b"") for t in resp.targets]
        push(Reservation(resp.epoch, resp.lease_seconds, targets), rid, kv)
        assert worker.blocks_used > 0
        msg = decode_pb2.DecodeRequest(request_id=rid, prompt_tokens=len(ids), first_token=first)
        for name, value in fields.items():
            if name == "sampling":
                msg.sampling.CopyFrom(value)
            else:
                setattr(msg, name, value)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Decode(msg, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rid, err.value.details())
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


def test_a_failed_loop_ends_every_request_with_unavailable(decode_service, default_model, monkeypatch):
    """The loop itself cannot go on (here: batched sampling raises): every stream ends with
    UNAVAILABLE at once, blocks are freed, the group is marked failed and fails liveness."""
    from ringserve.decode_service import worker as worker_module
    from ringserve.v1 import decode_pb2

    worker, stub = decode_service
    model, tokenizer = default_model
    failed = []
    worker.on_failure = lambda: failed.append(True)

    def broken(*args):
        raise RuntimeError("device lost")

    ids = tokenizer.encode("The capital of France is")
    kv, first = prompt_kv_and_first_token(model, ids)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    monkeypatch.setattr(worker_module, "sample_batch", broken)
    reqs = [start_with_kv(worker, f"r{i}", ids, kv, first, params) for i in range(2)]
    for req in reqs:
        with pytest.raises(Unavailable, match="decode loop failed: RuntimeError: device lost"):
            drain(req, timeout=60)
    assert failed and worker.failure and not worker.serving
    assert worker.blocks_used == 0 and not worker.requests
    with pytest.raises(grpc.RpcError) as err:
        stub.Reserve(decode_pb2.ReserveRequest(request_id="after", prompt_tokens=5, max_tokens=5))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_blocks_grow_on_demand_and_a_full_cache_ends_the_youngest(default_model):
    """7 blocks of 16: A and B reserve 3 each (prompt + one block of headroom), admission keeps a
    block per request for growth, both grow until the cache is full; B (the younger) ends with
    RESOURCE_EXHAUSTED and frees its blocks, A goes on and gives the engine's greedy tokens."""
    model, tokenizer = default_model
    worker = make_worker(model, tokenizer, kv_blocks=7, overlap=True)
    try:
        ids = tokenizer.encode("Write a long story about a dragon in a cave by the sea, and the knight who finds it.")
        assert 17 <= len(ids) <= 32  # two blocks of prompt, one of headroom
        kv, first = prompt_kv_and_first_token(model, ids)
        long_a = SamplingParams(max_tokens=112 - len(ids), ignore_eos=True)  # fits 7 blocks alone
        a = start_with_kv(worker, "a", ids, kv, first, long_a)
        assert worker.blocks_used == 3 and worker.admissible_blocks() == 3  # 4 free, 1 kept for A
        with pytest.raises(ResourceExhausted, match="1 are kept for running requests' growth"):
            worker.reserve("too-big", 60, 5)  # needs 4 blocks: only 3 may go to a new request
        b = start_with_kv(worker, "b", ids, kv, first, SamplingParams(max_tokens=200, ignore_eos=True))
        with pytest.raises(ResourceExhausted, match="decode KV cache full; retry"):
            drain(b, timeout=120)
        got = [e.token_id for e in drain(a, timeout=120)]
        assert got == [e.token_id for e in Engine(model, tokenizer).generate(ids, long_a)]
        assert worker.blocks_used == 0
    finally:
        worker.close()


def test_a_stream_does_not_wait_for_a_loop_that_is_gone(decode_service, default_model):
    """Whatever stops the loop thread without ending its requests, a waiting Decode stream notices
    within a poll and ends with UNAVAILABLE (here the loop is told to stop, as close() does)."""
    from ringserve.v1 import common_pb2, decode_pb2

    worker, stub = decode_service
    model, tokenizer = default_model
    ids = tokenizer.encode("Tell me a story.")
    kv, first = prompt_kv_and_first_token(model, ids)
    push(worker.reserve("s", len(ids), 500), "s", kv)
    sampling = common_pb2.SamplingParams(max_tokens=500, ignore_eos=True)
    stream = stub.Decode(
        decode_pb2.DecodeRequest(request_id="s", prompt_tokens=len(ids), first_token=first, sampling=sampling),
        timeout=60,
    )
    assert next(stream).token_ids[0] == first
    with worker.lock:
        worker._stop = True  # the loop returns at its next step, leaving the request running
        worker.lock.notify_all()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "decode loop stopped" in err.value.details()
