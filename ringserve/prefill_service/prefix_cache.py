"""The prefill tier's prefix cache: KV of finished prefills stays on its ranks and serves later
requests with the same prefix as a partial prefill over it (persistent KV, Yang et al. 2024 §3.2).

A cached block is one full KV block of some prompt, named by its chained hash (``block_hashes``),
and it lives on exactly one rank: the one that computed it. Pass pieces start on block
boundaries (``sharding.plan_pass``), so each block of a prompt is one physical block on one rank,
and a cached prefix of k blocks is, on each rank, simply those of the k blocks it holds. They
become that rank's "cached" part of the new sequence, ahead of its new pieces, as ring attention
expects (``RingLayout``). Blocks are shared, never copied: a prefix ends on a block boundary, so
new tokens never land in a cached block.

Who decides what: the leader's ``PrefixIndex`` knows which rank holds each cached block and in
what order they were used. For each job it makes one ``CachePlan`` (how many blocks to reuse, what
to evict, which new blocks to keep), sent to every rank with the job; each rank's ``RankBlocks``
only carries the plan out on its own blocks. The ranks never decide anything themselves.

Eviction is least recently used over blocks, in one order for the whole group. A job touches its
prompt's blocks deepest first, so a block is always used more recently than its children: the
least recently used block is always a leaf, and no cached block is ever left without its parent.
Blocks the job reads are never evicted for it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ringserve.engine.kv_cache import KVCache, blocks_needed
from ringserve.errors import ResourceExhausted
from ringserve.prefill_service.context_parallel import CPSequence
from ringserve.prefill_service.sharding import PassPlan, plan_pass


@dataclass(frozen=True)
class CachePlan:
    """The leader's decision for one job, the same for every rank."""

    hit_blocks: int = 0  # the prompt's blocks [0, hit_blocks) are read from the cache, not computed
    evict: tuple[bytes, ...] = ()  # cached blocks to free before the job
    store: tuple[tuple[int, int], ...] = ()  # (prompt block, rank holding it) to keep after the job


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds and how it has served lookups since the group started."""

    blocks: tuple[int, ...]  # cached blocks on each rank, leader first
    capacity: int  # blocks each rank may keep (0: the cache is off)
    lookups: int
    hits: int
    hit_tokens: int


def _pass_for(num_tokens: int, hit_blocks: int, world: int, block_size: int) -> PassPlan:
    """The pass that computes what the cache does not hold: every token after the cached prefix."""
    return plan_pass(num_tokens - hit_blocks * block_size, world, block_size)


class PrefixIndex:
    """The leader's view of the group's cache: the rank holding each cached block, in LRU order."""

    def __init__(self, world: int, kv_blocks: int, capacity: int, block_size: int):
        """``kv_blocks`` per rank in all; the cache keeps at most ``capacity`` of them per rank
        between jobs (0 turns it off)."""
        self.world, self.kv_blocks, self.capacity, self.block_size = world, kv_blocks, capacity, block_size
        self.owner: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self.held = [0] * world  # cached blocks per rank
        self.lookups = self.hits = self.hit_tokens = 0
        self._changes: dict[bytes, bool] = {}  # hash -> stored (True) or evicted, since last taken
        self._lock = threading.Lock()  # the residency publisher reads changes from its own thread

    def _matched(self, hashes: Sequence[bytes]) -> int:
        """Leading blocks of the chain that are cached."""
        matched = 0
        if self.capacity:
            while matched < len(hashes) and hashes[matched] in self.owner:
                matched += 1
        return matched

    def cached_tokens(self, hashes: Sequence[bytes], num_tokens: int) -> int:
        """Prompt tokens a job would take from the cache now (a lookup: nothing changes)."""
        with self._lock:
            return min(self._matched(hashes), (num_tokens - 1) // self.block_size) * self.block_size

    def plan(self, hashes: Sequence[bytes], num_tokens: int) -> CachePlan:
        """Decide how a prompt of ``num_tokens`` tokens with block hashes ``hashes`` runs.

        Reuse the longest cached prefix of whole blocks, leaving at least one token to compute
        (its logits give the first token); evict least recently used blocks until the job fits on
        every rank and what the cache keeps afterwards fits its capacity. If the job only fits
        without its cached prefix (the prefix's blocks may sit unevenly on the ranks), it runs
        cold and keeps nothing. Raises ResourceExhausted if it does not fit even then.
        """
        matched = self._matched(hashes)
        hit = min(matched, (num_tokens - 1) // self.block_size)
        plan = self._fit(hashes, num_tokens, hit, matched, keep_new=True)
        if plan is None and matched:
            plan = self._fit(hashes, num_tokens, 0, 0, keep_new=False)
        if plan is None:
            cold = _pass_for(num_tokens, 0, self.world, self.block_size)
            need = max(blocks_needed(cold.rank_len(r), self.block_size) for r in range(self.world))
            raise ResourceExhausted(
                f"a prompt of {num_tokens} tokens needs {need} KV blocks on one rank, but each rank of "
                f"this prefill group has {self.kv_blocks}; shorten the prompt or give the group more "
                "--kv-blocks or more --cp ranks"
            )
        return plan

    def _fit(
        self, hashes: Sequence[bytes], num_tokens: int, hit: int, matched: int, keep_new: bool
    ) -> CachePlan | None:
        """A plan reusing ``hit`` blocks with the prompt's first ``matched`` cached blocks kept out
        of eviction, or None if the job cannot fit next to them."""
        bs = self.block_size
        plan = _pass_for(num_tokens, hit, self.world, bs)
        need = [blocks_needed(plan.rank_len(r), bs) for r in range(self.world)]
        # New full blocks not cached yet, and the rank each is computed on; deepest last.
        owner = {hit + b: r for r in range(self.world) for b in plan.rank_blocks(r, bs)}
        store = [(j, owner[j]) for j in range(matched, num_tokens // bs)] if keep_new else []
        kept = [0] * self.world
        for _, r in store:
            kept[r] += 1
        held = list(self.held)
        in_use = set(hashes[:matched])
        victims = (h for h in self.owner if h not in in_use)  # least recently used first
        evict = []
        while True:
            fits = all(held[r] + need[r] <= self.kv_blocks for r in range(self.world))
            if fits and all(held[r] + kept[r] <= self.capacity for r in range(self.world)):
                return CachePlan(hit, tuple(evict), tuple(store))
            victim = next(victims, None)
            if victim is not None:  # older than anything this job touches: goes first
                evict.append(victim)
                held[self.owner[victim]] -= 1
            elif not fits:
                return None
            else:  # only the capacity is exceeded: keep fewer new blocks, deepest first
                kept[store.pop()[1]] -= 1

    def commit(self, hashes: Sequence[bytes], plan: CachePlan) -> None:
        """Record a job's plan once every rank has carried it out."""
        with self._lock:
            for h in plan.evict:
                self.held[self.owner.pop(h)] -= 1
                self._changes[h] = False
            for j, rank in plan.store:
                self.owner[hashes[j]] = rank
                self.held[rank] += 1
                self._changes[hashes[j]] = True
            for h in reversed(hashes):  # deepest first: a parent ends up more recent than its children
                if h in self.owner:
                    self.owner.move_to_end(h)
            self.lookups += 1
            self.hits += plan.hit_blocks > 0
            self.hit_tokens += plan.hit_blocks * self.block_size

    def take_changes(self) -> tuple[list[bytes], list[bytes]]:
        """Block hashes stored and evicted since the last call (a hash's latest change wins)."""
        with self._lock:
            changes, self._changes = self._changes, {}
        return [h for h, s in changes.items() if s], [h for h, s in changes.items() if not s]

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(tuple(self.held), self.capacity, self.lookups, self.hits, self.hit_tokens)

    def clear(self) -> None:
        """Forget every block (the ranks free theirs with ``RankBlocks.clear``); they count as evicted."""
        with self._lock:
            for h in self.owner:
                self._changes[h] = False
            self.owner.clear()
            self.held = [0] * self.world


class RankBlocks:
    """One rank's share of the cache: the physical block of each cached block it holds."""

    def __init__(self, cache: KVCache, rank: int, world: int):
        self.cache, self.rank, self.world = cache, rank, world
        self.blocks: dict[bytes, int] = {}  # hash -> block id in ``cache``

    def begin(self, hashes: Sequence[bytes], plan: CachePlan) -> CPSequence:
        """Carry out the plan's evictions; return the job's sequence, which starts with this
        rank's blocks of the cached prefix (read-only, in prompt order)."""
        self.cache.allocator.free([self.blocks.pop(h) for h in plan.evict if h in self.blocks])
        table = [self.blocks[h] for h in hashes[: plan.hit_blocks] if h in self.blocks]
        bs = self.cache.block_size
        return CPSequence(table, num_cached_local=len(table) * bs, num_done=plan.hit_blocks * bs)

    def finish(self, seq: CPSequence, hashes: Sequence[bytes], plan: CachePlan, num_tokens: int, keep: bool) -> None:
        """After the job: keep the plan's new blocks that are on this rank (only if the forward
        finished, ``keep``) and free the job's other blocks; the cached prefix's blocks stay."""
        num_hit = sum(h in self.blocks for h in hashes[: plan.hit_blocks])
        new = seq.block_table[num_hit:]
        if keep:
            bs = self.cache.block_size
            pass_blocks = _pass_for(num_tokens, plan.hit_blocks, self.world, bs).rank_blocks(self.rank, bs)
            by_prompt_block = {plan.hit_blocks + b: block for b, block in zip(pass_blocks, new)}
            for j, rank in plan.store:
                if rank == self.rank:
                    self.blocks[hashes[j]] = by_prompt_block.pop(j)
            new = list(by_prompt_block.values())
        self.cache.allocator.free(new)
        seq.block_table = []

    def clear(self) -> None:
        """Free every cached block of this rank."""
        self.cache.allocator.free(list(self.blocks.values()))
        self.blocks = {}
