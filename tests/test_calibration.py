"""The prefill cost model's seed: the same service on the same device plans the same chunking at every
start, even when some calibration runs are slowed by something else on the device."""

from __future__ import annotations

import random

import pytest

from ringserve.config import PrefillConfig
from ringserve.engine.config import ModelConfig
from ringserve.errors import InvalidArgument
from ringserve.prefill_service.calibration import (
    calibration_key,
    calibration_path,
    calibration_shapes,
    load_timings,
    store_timings,
)
from ringserve.prefill_service.cost_model import CostModel
from ringserve.prefill_service.scheduler import Scheduler, SchedulerConfig

# Fitted to one H200's measured passes (Llama-3-8B shape, bf16; bench/profile_gpu.py): fixed, per
# sequence, per token, per token pair.
TRUTH = (0.036, 0.004, 21.6e-6, 0.894e-9)


def true_s(work) -> float:
    fixed, per_seq, per_token, per_pair = TRUTH
    return fixed + per_seq * len(work) + sum(per_token * c + per_pair * c * (d + c / 2) for c, d in work)


def one_start(seed: int, repeats: int) -> CostModel:
    """Calibration as a group runs it: every shape ``repeats`` times, timing noise of 2%, and one run in
    three slowed 1.5-3x (the decode tier starting on the same GPU)."""
    rng = random.Random(seed)
    passes = []
    for work in calibration_shapes(32768, 64, late_chunks=True):
        times = [true_s(work) * rng.uniform(0.98, 1.02) for _ in range(repeats)]
        if rng.random() < 1 / 3:
            times[rng.randrange(repeats)] *= rng.uniform(1.5, 3.0)
        passes.append((work, times))
    cost = CostModel()
    cost.calibrate(passes)
    return cost


def plan(cost: CostModel, num_tokens: int) -> list[int]:
    """The chunks one prompt alone is prefilled in, planned with ``cost`` as it is now."""
    sched = Scheduler(SchedulerConfig(chunk_unit=64), cost.frozen())
    sched.add("long", num_tokens, 0, now=0.0)
    chunks = []
    while sched.requests:
        p = sched.next_pass(0.0)
        chunks.append(p[0].num_tokens)
        sched.pass_done(p, sched.cost.predict([(c.num_tokens, c.start) for c in p]), 0.0)
    return chunks


def test_calibration_shapes_cpu_unchanged_gpu_reaches_long_context():
    assert calibration_shapes(2048, 64, late_chunks=False) == [
        [(64, 0)], [(256, 0)], [(1024, 0)], [(64, 0)] * 4, [(512, 512)]
    ]  # fmt: skip
    gpu = calibration_shapes(32768, 64, late_chunks=True)
    assert [(32768, 0)] in gpu and [(16384, 16384)] in gpu and [(4096, 28672)] in gpu


def test_starts_with_slowed_runs_plan_the_same_chunking():
    truth = plan(CostModel(prior=TRUTH), 131072)
    plans = [plan(one_start(seed, repeats=3), 131072) for seed in range(6)]
    counts = {len(p) for p in plans}
    assert counts == {len(truth)}, f"passes per start {[len(p) for p in plans]}, truth {len(truth)}"
    for p in plans:  # chunk sizes within 5% of the ones the true costs give
        assert all(abs(a - b) <= 0.05 * b for a, b in zip(p[:-1], truth[:-1])), (p, truth)  # the last: what is left
    one_pass = CostModel(prior=TRUTH).remaining_s(131072, 0)
    for seed in range(6):
        assert one_start(seed, 3).remaining_s(131072, 0) == pytest.approx(one_pass, rel=0.05)


def test_calibration_stays_in_the_fit_after_the_window_fills():
    cost = one_start(0, 3)
    cost_window = CostModel(window=4)
    cost_window.calibrate([(w, [true_s(w)]) for w in calibration_shapes(32768, 64, late_chunks=True)])
    for _ in range(20):  # only short passes for a while
        cost_window.observe([(256, 0)], true_s([(256, 0)]))
    late = [(512, 120000)]
    assert cost_window.predict(late) == pytest.approx(true_s(late), rel=0.05)
    assert cost.fitted and cost_window.fitted


def test_calibrate_rejects_empty_input():
    with pytest.raises(InvalidArgument):
        CostModel().calibrate([])
    with pytest.raises(InvalidArgument):
        CostModel().calibrate([([(64, 0)], [])])


def test_the_old_seed_one_timed_run_of_short_shapes_plans_differently_per_start():
    """The defect this seed fixes, in the same simulated starts: shapes up to 2K tokens timed once
    each (as group calibration did) give 128K plans that differ from start to start."""
    plans = []
    for seed in range(6):
        rng, cost = random.Random(seed), CostModel()
        for work in calibration_shapes(2048, 64, late_chunks=False):
            t = true_s(work) * rng.uniform(0.98, 1.02)
            cost.observe(work, t * rng.uniform(1.5, 3.0) if rng.random() < 1 / 3 else t)
        plans.append(len(plan(cost, 131072)))
    assert len(set(plans)) > 1, plans


def test_stored_timings_serve_only_their_own_key(tmp_path, monkeypatch, caplog):
    """Timings are found again under the same key only: another layout, dtype or model shape times anew,
    and an unreadable file is ignored (with a warning), never trusted."""
    monkeypatch.setenv("RINGSERVE_CACHE_DIR", str(tmp_path))
    model = ModelConfig(vocab_size=97, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=4)  # fmt: skip
    cfg = PrefillConfig(model="unused", cp=2, block_size=16, kv_blocks=64, port=0)
    shapes = calibration_shapes(256, 32, late_chunks=False)
    key = calibration_key(cfg, model, shapes)
    timings = [(work, [0.01 * (i + 1), 0.02]) for i, work in enumerate(shapes)]
    assert load_timings(key) is None
    store_timings(key, timings)
    assert load_timings(key) == [([tuple(seq) for seq in work], times) for work, times in timings]
    others = [
        calibration_key(PrefillConfig(model="unused", cp=1, block_size=16, kv_blocks=64, port=0), model, shapes),
        calibration_key(PrefillConfig(model="unused", cp=2, block_size=16, kv_blocks=64, port=0, dtype="bfloat16"),
                        model, shapes),  # fmt: skip
        calibration_key(cfg, ModelConfig(**{**model.__dict__, "num_hidden_layers": 3}), shapes),
        calibration_key(cfg, model, shapes[:-1]),
    ]
    assert all(load_timings(other) is None for other in others)
    calibration_path(key).write_text('{"key": ')
    assert load_timings(key) is None and "ignoring the stored calibration" in caplog.text
