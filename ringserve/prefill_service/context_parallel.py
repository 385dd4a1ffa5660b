"""The context-parallel model forward: the engine's model run by N ranks over their shards.

Each rank runs every layer on its own tokens; only attention talks to the other ranks (ring
pass-KV or pass-Q). KV of a pass stays in the paged cache of the rank that computed it, so
later passes (chunks, turns) attend to it where it lies (partial prefill, Yang et al. §3.2).
The same code runs on gloo (CPU) and NCCL (GPU). Under TP x CP (``ringserve.mesh``) the model is a
TP shard (``engine.tp``), the group is the ranks of one TP index, and the ring carries only that
rank's heads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ringserve.engine.attention import attend_packed
from ringserve.engine.kv_cache import KVCache, as_run, blocks_needed
from ringserve.engine.model import Llama
from ringserve.prefill_service.ring import RingComm, RingLayout, SeqLayout, ring_pass_kv, ring_pass_q
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
    """The CP ``AttentionFn`` for one pass: store this rank's new K/V locally, then ring-attend.

    A pass may pack several sequences; the model sees their tokens concatenated."""

    def __init__(self, cache: KVCache, seqs: list[CPSequence], layout: RingLayout, strategy: str, comm: RingComm):
        self.cache, self.layout, self.comm = cache, layout, comm
        self.ring = ring_pass_kv if strategy == "pass_kv" else ring_pass_q
        # A sequence whose blocks are one consecutive run is read in place, not gathered.
        self.tables = [as_run(s.block_table) or cache.table(s.block_table) for s in seqs]
        self.lengths = [s.num_cached_local + sl.plan.rank_len(comm.rank) for s, sl in zip(seqs, layout.seqs)]
        self.slots = torch.cat(
            [cache.slots(t, s.num_cached_local, n) for s, t, n in zip(seqs, self.tables, self.lengths)]
        )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.slots, k, v)
        kv = [self.cache.read(layer, t, n) for t, n in zip(self.tables, self.lengths)]
        if self.comm.world == 1:
            # One rank holds each chunk whole, in token order, after its cached KV: bottom-right causal
            # attention of every sequence, packed (no ring buffer to pack, no pieces to merge).
            q_lens = [s.plan.rank_len(0) for s in self.layout.seqs]
            return attend_packed(q, [k for k, _ in kv], [v for _, v in kv], q_lens)[0]
        return self.ring(q, [k for k, _ in kv], [v for _, v in kv], self.layout, self.comm)


class CPRunner:
    """One rank of a CP group: runs prefill passes over the ring."""

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
    def prefill(
        self, seqs: list[CPSequence], chunks: list[list[int]], strategy: str | None = None
    ) -> list[torch.Tensor] | None:
        """One pass: prefill ``chunks[i]`` (the same on every rank) after what ``seqs[i]`` holds.

        Each sequence is sharded over the ranks on its own (``plan_pass``) and attends only to
        itself. Returns, on rank 0 (the leader), each chunk's last token's logits [V]; None elsewhere.
        """
        if len(seqs) != len(chunks) or not seqs or not all(chunks):
            raise ValueError(f"a pass needs one non-empty chunk per sequence, got {[len(c) for c in chunks]}")
        plans = [plan_pass(len(c), self.world, self.cache.block_size) for c in chunks]
        cached = torch.tensor([s.num_cached_local for s in seqs], device=self.device)
        everyone = [torch.empty_like(cached) for _ in range(self.world)]
        with self.comm.peer_errors():
            dist.all_gather(everyone, cached, group=self.comm.group)
        per_rank = torch.stack(everyone).tolist()  # [rank][seq]
        layout = RingLayout(tuple(SeqLayout(p, tuple(r[i] for r in per_rank)) for i, p in enumerate(plans)))
        c = self.model.config
        chosen = choose_strategy(
            strategy or self.strategy,
            sum(len(ch) for ch in chunks),
            sum(s.num_done for s in seqs),
            self.world,
            c.num_attention_heads,
            c.num_key_value_heads,
            self.cache.k.element_size(),
            self.rates,
        )
        self.last_strategy = chosen
        ids, positions, at = [], [], []
        for seq, chunk, plan in zip(seqs, chunks, plans):
            n_mine = plan.rank_len(self.rank)
            grow = blocks_needed(seq.num_cached_local + n_mine, self.cache.block_size) - len(seq.block_table)
            if grow > 0:
                seq.block_table += self.cache.allocator.allocate(grow)
            local = torch.cat([torch.arange(*plan.pieces[p]) for p in plan.rank_pieces(self.rank)])
            ids.append(torch.as_tensor(chunk, dtype=torch.long)[local])
            positions.append(local + seq.num_done)
            # A pass's last token is the last of rank 0's late piece (sharding puts it there).
            at.append(sum(len(i) for i in ids) - 1)
        attention = RingAttention(self.cache, seqs, layout, chosen, self.comm)
        logits_at = torch.tensor(at if self.rank == 0 else [], dtype=torch.long, device=self.device)
        logits = self.model(
            torch.cat(ids).to(self.device), torch.cat(positions).to(self.device), attention, logits_at=logits_at
        )
        for seq, chunk, plan in zip(seqs, chunks, plans):
            seq.num_cached_local += plan.rank_len(self.rank)
            seq.num_done += len(chunk)
        return list(logits) if self.rank == 0 else None
