"""Fitting the prefill scheduler's cost model before a group serves: passes of made-up prompts (one
chunk alone at several sizes, a packed pass, chunks after a prefix), timed like real ones. On a GPU
the shapes reach long context and each is timed several times, its fastest run counting, so two
starts of the same service fit nearly the same model. The model goes on learning from every real
pass.

The timings are stored under the cache directory, keyed by everything a pass's time depends on
(the model's shape and dtype, the group's layout, the device, the software); a later start with the
same key fits the same model from them instead of timing again (``--recalibrate`` times anew), so
restarts plan the same way and come up without the calibration's tens of seconds."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch

from ringserve.engine.attention import backend_name
from ringserve.engine.config import ModelConfig
from ringserve.engine.weights import atomic_write, cache_root
from ringserve.prefill_service.cost_model import CostModel
from ringserve.prefill_service.pass_runner import PassRunner
from ringserve.prefill_service.prefix_cache import CacheStart, new_blocks_per_rank
from ringserve.prefill_service.protocol import ChunkWork, Pass

log = logging.getLogger(__name__)


def calibration_shapes(max_tokens: int, unit: int, late_chunks: bool) -> list[list[tuple[int, int]]]:
    """The passes to time, each as (new tokens, tokens before) per sequence: one chunk alone from
    ``unit`` up to ``max_tokens`` (x4 apart; fixed and per-token costs), four small chunks packed
    (per-sequence cost), and a chunk after as many tokens before (attention over earlier KV).
    ``late_chunks`` adds the largest pass itself and a small chunk after 7/8 of it: the shape of a
    long prompt's late chunks, whose attention over long cached KV sizes them (on a GPU, where
    passes of tens of thousands of tokens are cheap enough to time at start)."""
    sizes = [unit * 4**k for k in range(32) if unit * 4**k <= max_tokens] or [unit]
    top = max_tokens // unit * unit
    if late_chunks and top > sizes[-1]:
        sizes.append(top)
    top = sizes[-1]
    shapes = [[(n, 0)] for n in sizes] + [[(sizes[0], 0)] * 4]
    shapes.append([(top // 2, top // 2)])
    if late_chunks and top >= 8 * unit:
        late = top // 8 // unit * unit
        shapes.append([(late, top - late)])
    return shapes


def _largest_pass(block_size: int, world: int, calibrate_tokens: int, kv_blocks: int) -> int:
    """``--calibrate-tokens`` in whole units, halved until a pass of it fits the pool 4 times over."""
    unit = block_size * world
    top = max(unit, calibrate_tokens // unit * unit)
    while top > unit and max(new_blocks_per_rank(top, world, block_size)) * 4 > kv_blocks:
        top = max(unit, top // 2 // unit * unit)
    return top


Timings = list[tuple[list[tuple[int, int]], list[float]]]


def calibration_key(cfg, model: ModelConfig, shapes: list[list[tuple[int, int]]]) -> dict:
    """Everything a calibration pass's time depends on; ``cfg`` is the group's PrefillConfig."""
    if cfg.device.startswith("cuda"):
        device = torch.cuda.get_device_name(torch.device(cfg.device))
    else:
        device = f"{platform.machine()} {platform.processor()} x{os.cpu_count()} threads {torch.get_num_threads()}"
    return {
        "model": dataclasses.asdict(model),
        "dtype": cfg.dtype,
        "layout": {"tp": cfg.tp, "cp": cfg.cp, "block_size": cfg.block_size, "strategy": cfg.strategy},
        "device": device,
        "attention": backend_name(torch.device(cfg.device)),
        "software": {"ringserve": _version(), "torch": torch.__version__},
        "shapes": shapes,
    }


def _version() -> str:
    try:
        return importlib.metadata.version("ringserve")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "source"


def calibration_path(key: dict) -> Path:
    """Where the timings of ``key`` are stored."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "calibration" / f"{digest}.json"


def load_timings(key: dict) -> Timings | None:
    """The stored timings of ``key``, or None (none stored, another key, or an unreadable file)."""
    path = calibration_path(key)
    try:
        stored = json.loads(path.read_text())
        if stored["key"] != json.loads(json.dumps(key)):
            return None
        timings = [([tuple(seq) for seq in work], [float(t) for t in times]) for work, times in stored["timings"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the stored calibration %s (%s); timing the shapes again", path, e)
        return None
    log.info("prefill cost model from the calibration stored %s at %s (--recalibrate times it again)",
             stored.get("timed", "?"), path)  # fmt: skip
    return timings


def store_timings(key: dict, timings: Timings) -> None:
    """Keep ``timings`` for later starts with the same ``key`` (a failure to write only logs)."""
    record = {"key": key, "timed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "timings": timings}
    try:
        atomic_write(calibration_path(key), lambda tmp: tmp.write_text(json.dumps(record)))
    except OSError as e:
        log.warning("could not store the calibration (%s); the next start times it again", e)


def calibrate(ranks: PassRunner, cost: CostModel, model: ModelConfig) -> None:
    """Seed ``cost`` (``CostModel.calibrate``) from the stored timings of this group's key, or by
    timing every shape on the group: each shape once untimed (a first call may pay one-time costs:
    kernel plans), then timed; on a GPU 3 to 10 times (about a second of runs each), interleaved
    with the other shapes so that a slow stretch (the decode tier loading beside this group) spoils
    only some runs of each. Runs outside the scheduler and the prefix index."""
    cfg = ranks.cfg
    unit = cfg.block_size * cfg.cp
    on_gpu = cfg.device.startswith("cuda")
    top = _largest_pass(cfg.block_size, cfg.cp, cfg.calibrate_tokens, cfg.kv_blocks)
    shapes = calibration_shapes(top, unit, late_chunks=on_gpu)
    key = calibration_key(cfg, model, shapes)
    timings = None if cfg.recalibrate else load_timings(key)
    if timings is None:
        timings = _time_shapes(ranks, model.vocab_size, shapes, on_gpu)
        store_timings(key, timings)
    cost.calibrate(timings)
    log.info("prefill cost model: %s", cost)


def _time_shapes(ranks: PassRunner, vocab: int, shapes: list[list[tuple[int, int]]], on_gpu: bool) -> Timings:
    """Each shape's measured times (see ``calibrate``)."""
    log.info("calibrating the prefill scheduler's cost model (%d shapes)", len(shapes))
    warm = [_time_pass(ranks, vocab, i, shape) for i, shape in enumerate(shapes)]
    repeats = [min(10, max(3, math.ceil(1.0 / max(w, 1e-3)))) if on_gpu else 1 for w in warm]
    times: list[list[float]] = [[] for _ in shapes]
    for r in range(max(repeats)):
        for i, shape in enumerate(shapes):
            if r < repeats[i]:
                times[i].append(_time_pass(ranks, vocab, i, shape))
    for shape, t in zip(shapes, times):
        log.debug("calibration %s: %s s", shape, ", ".join(f"{x:.4f}" for x in t))
    return list(zip(shapes, times))


def _time_pass(ranks: PassRunner, vocab: int, i: int, shape: list[tuple[int, int]]) -> float:
    """One calibration pass of made-up prompts (the tokens before a chunk as an untimed pass of
    their own); its time, its blocks freed."""
    cfg = ranks.cfg
    bs, world = cfg.block_size, cfg.cp
    prefix, work = [], []
    for k, (new, before) in enumerate(shape):
        name = f"calibration-{i}.{k}"
        begin = CacheStart((), new_blocks_per_rank(new + before, world, bs))
        ids = [(7 * t + k + 1) % vocab for t in range(new + before)]
        if before:
            prefix.append(ChunkWork(name, ids[:before], 0, begin))
            begin = None
        work.append(ChunkWork(name, ids[before:], before, begin))
    if prefix:
        ranks.run(Pass(tuple(prefix), cfg.strategy))
    _, reports = ranks.run(Pass(tuple(work), cfg.strategy))
    ranks.run(Pass((), cfg.strategy, drop=tuple(ranks.active)))
    return max(r.forward_s for r in reports)
