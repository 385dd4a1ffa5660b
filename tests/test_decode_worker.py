"""The decode worker of a one-rank group, in process: continuous batching is exact, KV lands
through the real receiver, and no path leaks blocks."""

import time

import pytest
import torch

from ringserve.config import DecodeConfig
from ringserve.decode_service.group import DecodeGroup
from ringserve.decode_service.server import DecodeServicer
from ringserve.decode_service.worker import DecodeWorker
from ringserve.engine.engine import Engine
from ringserve.engine.kv_cache import KVCache, PagedAttention, SeqSpan
from ringserve.engine.sampling import SamplingParams
from ringserve.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ringserve.kv_transfer.tcp import send_kv
from ringserve.v1 import common_pb2


def make_worker(model, tokenizer, kv_blocks=64, reservation_ttl_s=60.0, **kw) -> DecodeWorker:
    group = DecodeGroup(DecodeConfig(kv_blocks=kv_blocks, block_size=16, kv_transfer="tcp"), model=model)
    return DecodeWorker(group, tokenizer, reservation_ttl_s=reservation_ttl_s, **kw)


def send(address, request_id, epoch, first, kv, transfer_id="t0"):
    """One TCP push of rows [first, first + n) of a request's reservation ``epoch``."""
    return send_kv(address, request_id, epoch, transfer_id, [(first, kv)])


def push(reservation, request_id, kv, nixl=None):
    """Send each rank its share, as the prefill tier would: through the real TCP path, or with
    ``nixl`` (a NixlSender) a NIXL WRITE into the landing the reservation answered."""
    for _, address, first, count, landing, *_ in reservation.targets:
        if count and nixl is not None:
            assert landing, "the decode group offers no NIXL landing"
            nixl.push(request_id, kv[:, :, first : first + count], landing)
        elif count:
            send(address, request_id, reservation.epoch, first, kv[:, :, first : first + count])


class NixlSender:
    """A prefill rank's side of NIXL in a test: a paged cache the rows are copied into, and the
    endpoint that WRITEs them into a decode rank's blocks."""

    def __init__(self, config, num_blocks=64, block_size=16):
        from ringserve.kv_transfer.nixl import NixlEndpoint

        self.cache = KVCache(config, num_blocks, block_size)
        self.endpoint = NixlEndpoint(self.cache)

    def push(self, request_id, kv, landing):
        n = kv.shape[2]
        table = self.cache.allocator.allocate(-(-n // self.cache.block_size))
        try:
            slots = self.cache.slots(table, 0, n)
            for layer in range(kv.shape[0]):
                self.cache.write(layer, slots, kv[layer, 0], kv[layer, 1])
            self.endpoint.push(table, 0, n, landing, 0, transfer_id=request_id)
        finally:
            self.cache.allocator.free(table)

    def close(self):
        self.endpoint.close()


@pytest.fixture
def worker(default_model):
    model, tokenizer = default_model
    w = make_worker(model, tokenizer, landing_timeout_s=0.5, overlap=True)  # a GPU's loop, on CPU
    yield w
    w.close()
    assert w.blocks_used == 0


def prompt_kv_and_first_token(model, ids):
    """What the prefill tier would produce: the prompt's KV rows and the greedy first token."""
    cache = KVCache(model.config, num_blocks=32, block_size=16)
    table = cache.allocator.allocate(-(-len(ids) // 16))
    with torch.inference_mode():
        logits = model(
            torch.tensor(ids), torch.arange(len(ids)), PagedAttention(cache, [SeqSpan(0, len(ids), table, 0)])
        )
    kv = torch.stack(
        [torch.stack(cache.read(layer, table, len(ids))) for layer in range(model.config.num_hidden_layers)]
    )
    return kv, int(logits[-1].argmax())


def start_prefilled(worker, model, request_id, ids, params):
    """Reserve, land the prompt's KV as the prefill tier would, and start decoding it."""
    kv, first = prompt_kv_and_first_token(model, ids)
    push(worker.reserve(request_id, len(ids), params.max_tokens), request_id, kv)
    return worker.start(request_id, len(ids), first, params)


def drain(req, timeout=60):
    events = []
    deadline = time.monotonic() + timeout
    while not events or events[-1].finish_reason is None:
        ev = req.events.get(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(ev, Exception):
            raise ev
        events.append(ev)
    return events


def test_requests_joining_a_running_batch_match_the_engine(worker, default_model):
    model, tokenizer = default_model
    engine = Engine(model, tokenizer)
    prompts = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,"]
    reqs = []
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p)
        kv, first = prompt_kv_and_first_token(model, ids)
        res = worker.reserve(f"r{i}", len(ids), 20)
        [(rank, address, start, count, *_)] = res.targets
        assert (rank, start, count) == (0, 0, len(ids))
        # Two transfers, as two prefill ranks would send them (any split works: KV is a set).
        half = len(ids) // 2
        send(address, f"r{i}", res.epoch, 0, kv[:, :, :half], "0.0")
        send(address, f"r{i}", res.epoch, half, kv[:, :, half:], "1.0")
        reqs.append((ids, worker.start(f"r{i}", len(ids), first, SamplingParams(max_tokens=20, ignore_eos=True))))
        time.sleep(0.3)  # the next request joins while this one is decoding
    for ids, req in reqs:
        got = [e.token_id for e in drain(req)]
        expected = [e.token_id for e in engine.generate(ids, SamplingParams(max_tokens=20, ignore_eos=True))]
        assert got == expected
    assert worker.blocks_used == 0


def test_bad_reservations_and_transfers(worker, default_model):
    model, _ = default_model
    used = worker.blocks_used
    with pytest.raises(InvalidArgument, match="context is 8192"):
        worker.reserve("big", 9000, 10)
    with pytest.raises(ResourceExhausted, match="KV cache full"):
        worker.reserve("huge", 2000, 10)
    assert worker.blocks_used == used
    res = worker.reserve("a", 10, 5)
    [(_, address, *_)] = res.targets
    with pytest.raises(InvalidArgument, match="already reserved"):
        worker.reserve("a", 10, 5)
    worker.group.rank0.landing_timeout_s = 0.2
    with pytest.raises(NotFound, match="no reservation"):
        send(address, "nope", res.epoch + 1, 0, torch.zeros(30, 2, 1, 3, 64))
    with pytest.raises(InvalidArgument, match="outside decode rank 0's share"):
        send(address, "a", res.epoch, 8, torch.zeros(30, 2, 5, 3, 64))
    with pytest.raises(InvalidArgument, match="does not match"):
        send(address, "a", res.epoch, 0, torch.zeros(30, 2, 5, 4, 64))
    with pytest.raises(FailedPrecondition, match="0 of 10"):
        worker.start("a", 10, 1, SamplingParams())
    assert not worker.cancel("a")  # a request that cannot start ends there: nothing left to release
    assert worker.blocks_used == used
    worker.reserve("b", 10, 5)
    assert worker.cancel("b") and not worker.cancel("b")
    assert worker.blocks_used == used


def test_unclaimed_reservations_expire(default_model):
    model, tokenizer = default_model
    w = make_worker(model, tokenizer, kv_blocks=16, reservation_ttl_s=0.5)
    try:
        w.reserve("forgotten", 20, 10)
        assert w.blocks_used > 0
        deadline = time.monotonic() + 10
        while w.blocks_used and time.monotonic() < deadline:
            time.sleep(0.1)
        assert w.blocks_used == 0
    finally:
        w.close()


def test_cancel_while_decoding_frees_blocks(worker, default_model):
    model, tokenizer = default_model
    ids = tokenizer.encode("Tell me a story.")
    req = start_prefilled(worker, model, "c", ids, SamplingParams(max_tokens=200, ignore_eos=True))
    req.events.get(timeout=30)
    worker.cancel("c")
    with pytest.raises(Cancelled):
        drain(req)
    assert worker.blocks_used == 0


def wait_queued(req, ready, timeout=60):
    """Wait until ``ready(items)`` holds for the request's queued events (nobody reads them)."""
    deadline = time.monotonic() + timeout
    while True:
        with req.events.mutex:
            items = list(req.events.queue)
        if ready(items):
            return items
        assert time.monotonic() < deadline, f"{len(items)} events queued"
        time.sleep(0.02)


def test_a_stream_sends_every_queued_token_in_one_message(worker, default_model):
    """A Decode stream that fell behind takes all that is queued as one message: the tokens in
    order, their text joined, the last one's finish reason, the count of all sent."""
    model, tokenizer = default_model
    ids = tokenizer.encode("The capital of France is")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    req = start_prefilled(worker, model, "q", ids, params)
    wait_queued(req, lambda items: len(items) == 8)
    expected = list(Engine(model, tokenizer).generate(ids, params))
    [msg] = DecodeServicer(worker, common_pb2.ModelDescription()).responses(req)
    assert list(msg.token_ids) == [e.token_id for e in expected]
    assert msg.text == "".join(e.text for e in expected)
    assert msg.finish_reason == common_pb2.FINISH_REASON_LENGTH and msg.completion_tokens == 8


def test_an_error_follows_the_tokens_queued_before_it(worker, default_model):
    model, tokenizer = default_model
    ids = tokenizer.encode("Tell me a story.")
    req = start_prefilled(worker, model, "e", ids, SamplingParams(max_tokens=200, ignore_eos=True))
    wait_queued(req, lambda items: len(items) >= 3)
    worker.cancel("e")
    items = wait_queued(req, lambda items: isinstance(items[-1], Cancelled))
    stream = DecodeServicer(worker, common_pb2.ModelDescription()).responses(req)
    msg = next(stream)
    assert list(msg.token_ids) == [e.token_id for e in items[:-1]] and msg.completion_tokens == len(items) - 1
    assert msg.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    with pytest.raises(Cancelled):
        next(stream)
