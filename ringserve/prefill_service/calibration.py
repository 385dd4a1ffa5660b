"""Fitting the prefill scheduler's cost model before a group serves: a few passes of made-up
prompts (one chunk alone at several sizes, a packed pass, a chunk after a prefix), timed like real
ones. The model goes on learning from every real pass."""

from __future__ import annotations

import logging

from ringserve.prefill_service.pass_runner import PassRunner
from ringserve.prefill_service.prefix_cache import CacheStart, new_blocks_per_rank
from ringserve.prefill_service.protocol import ChunkWork, Pass
from ringserve.prefill_service.scheduler import CostModel

log = logging.getLogger(__name__)


def calibration_shapes(
    block_size: int, world: int, calibrate_tokens: int, kv_blocks: int
) -> list[list[tuple[int, int]]]:
    """The passes to time, each as its chunks' (new tokens, tokens before)."""
    unit = block_size * world
    sizes = [n for n in (unit, 4 * unit, 16 * unit, 64 * unit, 256 * unit) if n <= calibrate_tokens]
    sizes = [n for n in sizes if max(new_blocks_per_rank(n, world, block_size)) * 4 <= kv_blocks] or [unit]
    shapes = [[(n, 0)] for n in sizes] + [[(sizes[0], 0)] * 4]
    shapes.append([(sizes[-1] // 2, sizes[-1] // 2)])
    return shapes


def calibrate(ranks: PassRunner, cost: CostModel, vocab: int) -> None:
    """Time every shape twice on the group, fitting ``cost`` to the second run (a first call may pay
    one-time costs: kernel plans). Runs outside the scheduler and the prefix index."""
    cfg = ranks.cfg
    bs, world = cfg.block_size, cfg.cp
    shapes = calibration_shapes(bs, world, cfg.calibrate_tokens, cfg.kv_blocks)
    log.info("calibrating the prefill scheduler's cost model (%d passes)", 2 * len(shapes))
    for i, shape in enumerate(shapes + shapes):
        prefix, work = [], []
        for k, (new, before) in enumerate(shape):
            name = f"calibration-{i}.{k}"
            begin = CacheStart((), new_blocks_per_rank(new + before, world, bs))
            ids = [(7 * t + k + 1) % vocab for t in range(new + before)]
            if before:  # the earlier tokens as a chunk of their own, untimed
                prefix.append(ChunkWork(name, ids[:before], 0, begin))
                begin = None
            work.append(ChunkWork(name, ids[before:], before, begin))
        if prefix:
            ranks.run(Pass(tuple(prefix), cfg.strategy))
        _, reports = ranks.run(Pass(tuple(work), cfg.strategy))
        seconds = max(r.forward_s for r in reports)
        ranks.run(Pass((), cfg.strategy, drop=tuple(ranks.active)))
        if i >= len(shapes):
            cost.observe(shape, seconds)
        log.debug("calibration pass %d/%d %s: %.3f s", i + 1, 2 * len(shapes), shape, seconds)
    log.info("prefill cost model: %s", cost)
