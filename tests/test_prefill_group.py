"""The prefill group end to end: real CP processes (gloo), the scheduler, the prefix cache, KV
pushed over TCP to a receiver standing in for the decode tier.

Whatever the chunking, packing and order of passes, every prompt's logits and KV equal a
single-process prefill of the same weights, and no request leaves a block behind.
"""

import random
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from test_cp_model import single_process_kv
from test_model import run_chunks, tiny_hf

from ringserve.config import PrefillConfig
from ringserve.engine.model import Llama
from ringserve.errors import Aborted, Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from ringserve.kv_transfer.tcp import KVReceiver
from ringserve.prefill_service.group import PrefillGroup
from ringserve.prefill_service.protocol import Job
from ringserve.prefill_service.push import Target

BLOCK = 8


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(97) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_hf(8, 2, False, seed=7).save_pretrained(path)
    return path


class Landing:
    """The decode tier's stand-in: collects each request's pushed KV rows."""

    def __init__(self):
        self.rows: dict[str, list] = {}
        self.lock = threading.Lock()
        self.receiver = KVReceiver(lambda frame: None, self._sink)

    def _sink(self, frame, kv):
        with self.lock:
            self.rows.setdefault(frame.request_id, []).append((frame.first_position, kv.clone()))

    def job(self, request_id: str, ids: list[int], **kw) -> Job:
        return Job(request_id, ids, "auto", [Target(self.receiver.address, 0, len(ids))], **kw)

    def kv(self, request_id: str) -> torch.Tensor:
        """[layers, 2, T, Hkv, D] in the order the decode side stores them (a shard is a set)."""
        with self.lock:
            return torch.cat([kv for _, kv in sorted(self.rows.pop(request_id), key=lambda x: x[0])], dim=2)


@contextmanager
def running_group(model_dir, world: int, **overrides):
    settings = dict(model=str(model_dir), cp=world, kv_blocks=64, block_size=BLOCK, kv_transfer="tcp", port=0)
    cfg = PrefillConfig(**{**settings, **overrides})
    group = PrefillGroup(cfg)
    landing = Landing()
    try:
        yield group, landing
    finally:
        group.close()
        landing.receiver.close()


def assert_same_rows(landed: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    """The landed KV rows are the reference rows, each exactly once, in some order."""
    assert landed.shape == ref.shape
    a = landed.permute(2, 0, 1, 3, 4).flatten(1)
    b = ref.permute(2, 0, 1, 3, 4).flatten(1)
    match = torch.cdist(a, b).argmin(dim=1)
    assert sorted(match.tolist()) == list(range(len(b))), "a token's KV is missing or landed twice"
    assert (a - b[match]).abs().max() < atol


def assert_exact(model: Llama, landing: Landing, request_id: str, ids: list[int], done, atol=1e-4) -> None:
    ref = run_chunks(model, ids, [len(ids)], block_size=BLOCK)[-1]
    torch.testing.assert_close(done.logits, ref, atol=atol, rtol=atol)
    assert done.logits.argmax() == ref.argmax()
    assert_same_rows(landing.kv(request_id), single_process_kv(model, ids), atol)


def assert_nothing_held_but_the_cache(group: PrefillGroup) -> None:
    """Between requests a rank holds only its cached blocks (the group checks every rank after
    every pass and breaks if one differs; here the leader's counters are checked directly). A
    request is answered before the pass that frees its blocks: wait for that pass."""
    deadline = time.monotonic() + 30
    while (group._finishing or group.ranks.active) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not group.broken
    assert group.index.reserved == [0] * group.cfg.cp and not group.index.pins
    assert group.runner.cache.allocator.num_used == group.index.held[0]
    assert not group.ranks.active


@pytest.mark.parametrize("world", [1, 2, 3])
def test_chunked_packed_and_cached_prefills_equal_single_process(tiny_dir, world):
    """Small passes (two chunk units) force long prompts into chunks, short ones are packed, and
    prompts that share a prefix read blocks that chunked prefills stored."""
    model = Llama.load(str(tiny_dir), progress=False)
    unit = BLOCK * world
    with running_group(tiny_dir, world, max_pass_tokens=2 * unit) as (group, landing):
        # A burst at once: packed where they fit, the long one in chunks between them.
        burst = {"long": tokens(123, 1), "one": tokens(1, 2), "five": tokens(5, 3), "mid": tokens(40, 4)}
        burst["edge"] = tokens(unit, 5)  # exactly one chunk unit
        futures = {rid: group.submit(landing.job(rid, ids)) for rid, ids in burst.items()}
        done = {rid: f.result(timeout=120) for rid, f in futures.items()}
        for rid, ids in burst.items():
            assert_exact(model, landing, rid, ids, done[rid])
        assert done["long"].passes >= -(-123 // (2 * unit))
        assert group.scheduler.passes < sum(d.passes for d in done.values()), "nothing was packed"
        assert_nothing_held_but_the_cache(group)

        # One after another: cached prefixes (stored by chunked prefills) serve later prompts.
        doc = burst["long"]
        cases = [  # (prompt, prompt tokens expected from the cache)
            (doc, 120),  # the same prompt: its 15 full blocks (it was stored in chunks)
            (doc[:45] + tokens(20, 12), 40),  # a question about the first 45 tokens
            (doc + [int(done["long"].logits.argmax())] + tokens(12, 14), 120),  # turn 2
        ]
        for i, (ids, cached) in enumerate(cases):
            result = group.submit(landing.job(f"turn{i}", ids)).result(timeout=60)
            assert result.cached_tokens == cached
            assert_exact(model, landing, f"turn{i}", ids, result)
            assert_nothing_held_but_the_cache(group)
    assert group.runner.cache.allocator.num_used == 0, "blocks left after the group closed"


def finish_order(group: PrefillGroup, landing: Landing, jobs: list[tuple[str, list[int], float]]) -> list[str]:
    """Submit the long job, then the others once it has run a pass; the order they finish in."""
    order: list[str] = []
    futures = []
    for i, (rid, ids, ttft_s) in enumerate(jobs):
        futures.append(group.submit(landing.job(rid, ids, ttft_s=ttft_s)))
        futures[-1].add_done_callback(lambda f, rid=rid: order.append(rid))
        if i == 0:
            deadline = time.monotonic() + 30
            while group.scheduler.passes == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
    for f in futures:
        f.result(timeout=120)
    return order


@pytest.mark.parametrize("policy", ["lrs", "fcfs"])
def test_short_prompt_overtakes_a_long_one_only_under_lrs(tiny_dir, policy):
    """A long prompt in many small passes, then a short one with a tight deadline: least slack
    first serves the short one at the next chunk boundary; first-come-first-served makes it wait."""
    model = Llama.load(str(tiny_dir), progress=False)
    with running_group(tiny_dir, 2, max_pass_tokens=16, schedule=policy) as (group, landing):
        long_ids, short_ids = tokens(200, 20), tokens(9, 21)
        order = finish_order(group, landing, [("long", long_ids, 600.0), ("short", short_ids, 5.0)])
        assert order == (["short", "long"] if policy == "lrs" else ["long", "short"])
        for rid, ids in (("long", long_ids), ("short", short_ids)):
            landed = landing.kv(rid)
            assert_same_rows(landed, single_process_kv(model, ids), 1e-4)
        assert_nothing_held_but_the_cache(group)


def test_cancelled_and_failed_requests_free_their_blocks(tiny_dir):
    with running_group(tiny_dir, 2, max_pass_tokens=16, prefix_cache=0.0) as (group, landing):
        # Cancelled after it started: its blocks are freed at the next pass boundary.
        started = group.submit(landing.job("started", tokens(200, 30), ttft_s=600.0))
        while group.scheduler.passes == 0:
            time.sleep(0.001)
        group.cancel("started")
        with pytest.raises(Cancelled, match="cancelled by its client"):
            started.result(timeout=30)
        # A push to a decode rank that is not there fails that request only (ABORTED, naming the
        # decode rank: the decode side's fault); its pass-mate lands.
        bad = group.submit(Job("bad", tokens(20, 31), "auto", [Target("127.0.0.1:1", 0, 20)]))
        good = group.submit(landing.job("good", tokens(20, 32)))
        with pytest.raises(Aborted, match="KV transfer to decode rank at 127.0.0.1:1 failed"):
            bad.result(timeout=60)
        assert good.result(timeout=60).passes >= 1
        landing.kv("good")
        # Queued, never started: cancelled before the loop takes it (or just after; either way).
        queued = group.submit(landing.job("queued", tokens(30, 33)))
        group.cancel("queued")
        try:
            queued.result(timeout=30)
        except Cancelled:
            pass
        # A pass that only frees the cancelled request's blocks may still be on its way.
        deadline = time.monotonic() + 10
        while group._drop and time.monotonic() < deadline:
            time.sleep(0.01)
        group.submit(landing.job("after", tokens(3, 34))).result(timeout=30)
        assert_nothing_held_but_the_cache(group)
        assert group.index.held == [0, 0]


def test_admission_errors_queue_nothing(tiny_dir):
    with running_group(tiny_dir, 2, kv_blocks=8, reject_late=True) as (group, landing):
        with pytest.raises(ResourceExhausted, match="needs 9 KV blocks on one rank.*has 8"):
            group.submit(landing.job("huge", tokens(130, 40)))
        with pytest.raises(DeadlineExceeded, match="TTFT budget is 0.00 s"):
            group.submit(landing.job("late", tokens(100, 41), ttft_s=1e-6))
        slow = group.submit(landing.job("dup", tokens(60, 42)))
        with pytest.raises(InvalidArgument, match="dup"):
            group.submit(landing.job("dup", tokens(60, 43)))
        slow.result(timeout=60)
        landing.kv("dup")
        assert group.scheduler.requests == [] and not group._requests
        assert_nothing_held_but_the_cache(group)


def test_closing_group_ends_queued_requests_with_unavailable(tiny_dir):
    with running_group(tiny_dir, 2, max_pass_tokens=16, prefix_cache=0.0) as (group, landing):
        futures = [group.submit(landing.job(f"r{i}", tokens(200, 50 + i), ttft_s=600.0)) for i in range(3)]
        while group.scheduler.passes == 0:
            time.sleep(0.001)
        group.close()
        for f in futures:
            with pytest.raises(Unavailable, match="stopped"):
                f.result(timeout=30)
        with pytest.raises(Unavailable):
            group.submit(landing.job("late", tokens(5, 60)))
        assert group.runner.cache.allocator.num_used == 0


def test_rank_that_dies_while_idle_breaks_the_group_at_once(tiny_dir):
    """An idle group must notice a dead child rank by itself (not 120 s later, at the next
    request's pass): it marks itself broken, tells its owner once, and refuses new work."""
    broken = []
    with running_group(tiny_dir, 2) as (group, landing):
        group.on_broken = broken.append
        group.submit(landing.job("before", tokens(20, 70))).result(timeout=60)
        landing.kv("before")
        group.procs[0].kill()
        deadline = time.monotonic() + 30
        while not broken and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group.broken and len(broken) == 1 and "prefill-rank1" in broken[0]
        with pytest.raises(Unavailable, match="broken"):
            group.submit(landing.job("after", tokens(5, 71)))


@contextmanager
def hanging_receiver():
    """A decode rank that accepts connections and then never reads or answers (stuck, not dead)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        server.close()


def test_a_stuck_decode_rank_fails_only_its_request_and_stalls_no_pass(tiny_dir):
    """Defect 6: a push to a decode rank that hangs runs beside the passes, not inside them: the
    next request is prefilled and answered meanwhile, and the stuck one fails alone, ABORTED,
    naming the decode rank (before: the whole group waited for it, then answered UNAVAILABLE)."""
    with running_group(tiny_dir, 2, kv_push_timeout_s=10.0) as (group, landing), hanging_receiver() as stuck:
        t0 = time.monotonic()
        hung = group.submit(Job("hung", tokens(20, 70), "auto", [Target(stuck, 0, 20)]))
        deadline = time.monotonic() + 60
        while group.scheduler.passes == 0 and time.monotonic() < deadline:  # its pass is over: it is pushing
            time.sleep(0.001)
        passes = group.scheduler.passes
        other = group.submit(landing.job("other", tokens(20, 71)))  # a pass of its own
        assert other.result(timeout=60).passes == 1 and group.scheduler.passes > passes
        assert not hung.done(), "the stuck push ended before its timeout"
        with pytest.raises(Aborted, match=f"KV transfer to decode rank at {stuck} failed"):
            hung.result(timeout=120)
        assert time.monotonic() - t0 >= 10.0
        landing.kv("other")
        group.submit(landing.job("after", tokens(9, 72))).result(timeout=60)
        landing.kv("after")
        assert_nothing_held_but_the_cache(group)


def test_a_restart_fits_the_stored_calibration_and_recalibrate_times_anew(tiny_dir, caplog):
    """The second start of the same group on the same machine fits its cost model from the first start's
    stored timings (the same coefficients, no passes timed); --recalibrate times the shapes again."""
    caplog.set_level("INFO", logger="ringserve.prefill_service.calibration")
    with running_group(tiny_dir, 1, block_size=4) as (group, _):
        first = group.cost.coefficients
    assert "calibrating the prefill scheduler's cost model" in caplog.text
    caplog.clear()
    with running_group(tiny_dir, 1, block_size=4) as (group, _):
        assert group.cost.coefficients == first
    assert "calibrating" not in caplog.text and "from the calibration stored" in caplog.text
    caplog.clear()
    with running_group(tiny_dir, 1, block_size=4, recalibrate=True):
        pass
    assert "calibrating the prefill scheduler's cost model" in caplog.text
