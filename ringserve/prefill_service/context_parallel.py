"""The context-parallel model forward: the engine's model run by N ranks over their shards.

Each rank runs every layer on its own tokens; only attention talks to the other ranks (ring
pass-KV or pass-Q). KV of a pass stays in the paged cache of the rank that computed it, so
later passes (chunks, turns) attend to it where it lies (partial prefill, Yang et al. §3.2).
The same code runs on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ringserve.engine.kv_cache import KVCache, blocks_needed
from ringserve.engine.model import Llama
from ringserve.prefill_service.ring import RingComm, RingLayout, ring_pass_kv, ring_pass_q
from ringserve.prefill_service.sharding import plan_pass
from ringserve.prefill_service.strategy import Rates, choose_strategy

log = logging.getLogger(__name__)


@dataclass
class CPSequence:
    """One sequence's share on this rank: local blocks, local cached count, tokens done group-wide."""

    block_table: list[int] = field(default_factory=list)
    num_cached_local: int = 0
    num_done: int = 0  # tokens of the sequence prefilled so far, on all ranks together


class RingAttention:
    """The CP ``AttentionFn`` for one pass: store this rank's new K/V locally, then ring-attend."""

    def __init__(self, cache: KVCache, seq: CPSequence, layout: RingLayout, strategy: str, comm: RingComm):
        self.cache, self.seq, self.layout, self.comm = cache, seq, layout, comm
        self.ring = ring_pass_kv if strategy == "pass_kv" else ring_pass_q
        n_new = layout.plan.rank_len(comm.rank)
        self.table = cache.table(seq.block_table)
        self.slots = cache.slots(self.table, seq.num_cached_local, seq.num_cached_local + n_new)
        self.length = seq.num_cached_local + n_new

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.slots, k, v)
        keys, values = self.cache.read(layer, self.table, self.length)
        return self.ring(q, keys, values, self.layout, self.comm)


class CPRunner:
    """One rank of a CP group: runs prefill passes of a sequence over the ring."""

    def __init__(
        self,
        model: Llama,
        cache: KVCache,
        group: dist.ProcessGroup | None = None,
        strategy: str = "auto",
        rates: Rates | None = None,
    ):
        self.model, self.cache = model, cache
        self.comm = RingComm(group)
        self.rank, self.world = self.comm.rank, self.comm.world
        self.device = next(model.parameters()).device
        self.strategy = strategy
        # Without measurements, assume transfer is cheap relative to compute (pass-KV hidden).
        self.rates = rates or Rates(compute=1e12, bandwidth=1e12)
        self.last_strategy: str | None = None

    @torch.inference_mode()
    def prefill(self, seq: CPSequence, new_ids: list[int], strategy: str | None = None) -> torch.Tensor | None:
        """Prefill ``new_ids`` (the same on every rank) after what ``seq`` already holds.

        Returns the last new token's logits [V] on rank 0 (the leader), None elsewhere.
        """
        plan = plan_pass(len(new_ids), self.world, self.cache.block_size)
        cached = torch.tensor([seq.num_cached_local], device=self.device)
        everyone = [torch.empty_like(cached) for _ in range(self.world)]
        with self.comm.peer_errors():
            dist.all_gather(everyone, cached, group=self.comm.group)
        layout = RingLayout(plan, tuple(int(c) for c in everyone))
        c = self.model.config
        chosen = choose_strategy(
            strategy or self.strategy,
            len(new_ids),
            seq.num_done,
            self.world,
            c.num_attention_heads,
            c.num_key_value_heads,
            self.cache.k.element_size(),
            self.rates,
        )
        self.last_strategy = chosen
        mine = plan.rank_tokens(self.rank)
        grow = blocks_needed(seq.num_cached_local + len(mine), self.cache.block_size) - len(seq.block_table)
        if grow > 0:
            seq.block_table += self.cache.allocator.allocate(grow)
        local = torch.cat([torch.arange(*plan.pieces[p], device=self.device) for p in plan.rank_pieces(self.rank)])
        ids = torch.as_tensor(new_ids, dtype=torch.long).to(self.device)[local]
        positions = local + seq.num_done
        # The pass's last token is the last of rank 0's late piece (sharding puts it there).
        at = [len(mine) - 1] if self.rank == 0 else []
        attention = RingAttention(self.cache, seq, layout, chosen, self.comm)
        logits_at = torch.tensor(at, dtype=torch.long, device=self.device)
        logits = self.model(ids, positions, attention, logits_at=logits_at)
        seq.num_cached_local += len(mine)
        seq.num_done += len(new_ids)
        return logits[0] if self.rank == 0 else None

    def release(self, seq: CPSequence) -> None:
        """Free the sequence's local blocks."""
        self.cache.allocator.free(seq.block_table)
        seq.block_table = []
