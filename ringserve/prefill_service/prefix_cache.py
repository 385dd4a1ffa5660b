"""The prefill tier's prefix cache: KV of finished prefills stays on its ranks and serves later
requests with the same prefix as a partial prefill over it (persistent KV, Yang et al. 2024 §3.2).

A cached block is one full KV block of some prompt, named by its chained hash (``block_hashes``),
and it lives on exactly one rank: the one that computed it. Pass pieces start on block
boundaries (``sharding.plan_pass``), so each block of a prompt is one physical block on one rank,
and a cached prefix of k blocks is, on each rank, simply those of the k blocks it holds. They
become that rank's "cached" part of the new sequence, ahead of its new pieces, as ring attention
expects (``RingLayout``). Blocks are shared, never copied: a prefix ends on a block boundary, so
new tokens never land in a cached block.

Who decides what: the leader's ``PrefixIndex`` knows which rank holds each cached block, in what
order they were used, and the KV blocks every request in flight holds. When a request starts
(``start``) it decides which cached blocks the request reads (they are pinned until it ends) and
reserves, on every rank, the blocks for the rest of its prompt; when it ends (``finish``) it
decides which of the new blocks the cache keeps. The ranks' ``RankBlocks`` only carry these
decisions out, in the order the leader sends them. The ranks never decide anything themselves.

A request's new blocks are reserved all at once, so a long prompt prefilled in chunks never runs
out of memory halfway. Per rank their number does not depend on the chunking: non-final chunks
are whole multiples of (block size x ranks) tokens, so every rank gets the same whole blocks of
each, exactly as if the prompt ran in one pass.

Eviction is least recently used over blocks, in one order for the whole group. A request touches
its prompt's blocks deepest first, so a block is always used more recently than its children: the
least recently used block is always a leaf, and no cached block is ever left without its parent.
Pinned blocks are never evicted.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ringserve.engine.kv_cache import KVCache, blocks_needed
from ringserve.errors import ResourceExhausted
from ringserve.prefill_service.context_parallel import CPSequence
from ringserve.prefill_service.sharding import plan_pass


@dataclass(frozen=True)
class CacheStart:
    """The leader's decision when a request starts, the same for every rank."""

    hit: tuple[bytes, ...]  # the prompt's leading blocks read from the cache instead of computed
    new_blocks: tuple[int, ...]  # per rank: blocks to allocate for the rest of the prompt


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds and how it has served lookups since the group started."""

    blocks: tuple[int, ...]  # cached blocks on each rank, leader first
    capacity: int  # blocks each rank may keep (0: the cache is off)
    lookups: int
    hits: int
    hit_tokens: int


def new_blocks_per_rank(num_new: int, world: int, block_size: int) -> tuple[int, ...]:
    """Blocks each rank holds of ``num_new`` tokens computed after a cached prefix."""
    plan = plan_pass(num_new, world, block_size)
    return tuple(blocks_needed(plan.rank_len(r), block_size) for r in range(world))


class PrefixIndex:
    """The leader's view of the group's KV blocks: the rank holding each cached block in LRU
    order, the blocks pinned by requests that read them, the blocks reserved by requests in flight."""

    def __init__(self, world: int, kv_blocks: int, capacity: int, block_size: int):
        """``kv_blocks`` per rank in all; the cache keeps at most ``capacity`` of them per rank
        between requests (0 turns it off)."""
        self.world, self.kv_blocks, self.capacity, self.block_size = world, kv_blocks, capacity, block_size
        self.owner: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self.held = [0] * world  # cached blocks per rank
        self.reserved = [0] * world  # blocks of requests in flight, cached prefixes excluded
        self.pins: Counter[bytes] = Counter()  # cached blocks read by requests in flight
        self.lookups = self.hits = self.hit_tokens = 0
        self._evicted: list[bytes] = []  # evictions the ranks have not been told of yet
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
        """Prompt tokens a request would take from the cache now (a lookup: nothing changes)."""
        with self._lock:
            return min(self._matched(hashes), (num_tokens - 1) // self.block_size) * self.block_size

    def check_fits(self, num_tokens: int) -> None:
        """Raise ResourceExhausted if a prompt cannot fit the group even when it is empty."""
        need = max(new_blocks_per_rank(num_tokens, self.world, self.block_size))
        if need > self.kv_blocks:
            raise ResourceExhausted(
                f"a prompt of {num_tokens} tokens needs {need} KV blocks on one rank, but each rank of "
                f"this prefill group has {self.kv_blocks}; shorten the prompt or give the group more "
                "--kv-blocks or more --cp ranks"
            )

    def start(self, hashes: Sequence[bytes], num_tokens: int) -> CacheStart | None:
        """Start a request of ``num_tokens`` tokens with block hashes ``hashes``, or None if it
        does not fit next to the requests in flight now (it waits for them).

        Reuse the longest cached prefix of whole blocks, leaving at least one token to compute
        (its logits give the first token); evict least recently used unpinned blocks until the
        rest of the prompt fits on every rank. If it only fits without its cached prefix (the
        prefix's blocks may sit unevenly on the ranks), it runs cold.
        """
        bs = self.block_size
        with self._lock:
            matched = self._matched(hashes)
            hit = min(matched, (num_tokens - 1) // bs)
            for reuse in (hit, 0) if hit else (0,):
                need = new_blocks_per_rank(num_tokens - reuse * bs, self.world, bs)
                evict = self._make_room(need, set(hashes[:matched]) if reuse else set())
                if evict is None:
                    continue
                for h in evict:
                    self._evict(h)
                self.pins.update(hashes[:reuse])
                self.reserved = [a + b for a, b in zip(self.reserved, need)]
                self.lookups += 1
                self.hits += reuse > 0
                self.hit_tokens += reuse * bs
                return CacheStart(tuple(hashes[:reuse]), need)
            return None

    def _make_room(self, need: Sequence[int], keep: set[bytes]) -> list[bytes] | None:
        """Least recently used cached blocks to evict so ``need`` more blocks fit on every rank
        (never pinned ones, nor ``keep``); None if evicting all that may go is not enough."""
        held = list(self.held)
        victims = (h for h in self.owner if h not in keep and not self.pins[h])
        evict = []
        while not all(held[r] + self.reserved[r] + need[r] <= self.kv_blocks for r in range(self.world)):
            victim = next(victims, None)
            if victim is None:
                return None
            evict.append(victim)
            held[self.owner[victim]] -= 1
        return evict

    def _evict(self, h: bytes) -> None:
        self.held[self.owner.pop(h)] -= 1
        self._evicted.append(h)
        self._changes[h] = False

    def finish(
        self, hashes: Sequence[bytes], start: CacheStart, owners: dict[int, int], keep: bool
    ) -> tuple[tuple[int, int, bytes], ...]:
        """End a request: unpin and unreserve its blocks, and decide which of its new full blocks
        the cache keeps; returns them as (prompt block, rank holding it, hash).

        ``owners`` maps each computed prompt block to its rank (it depends on the chunking).
        ``keep`` False (the prefill did not finish) keeps nothing. A block another request stored
        meanwhile is not stored twice. To stay within capacity, least recently used unpinned
        blocks are evicted first, then fewer new blocks kept, deepest first.
        """
        with self._lock:
            self.pins.subtract(start.hit)
            self.pins = +self.pins  # drop zero counts
            self.reserved = [a - b for a, b in zip(self.reserved, start.new_blocks)]
            if not keep or not self.capacity:
                return ()
            store = [(j, owners[j]) for j in sorted(owners) if j < len(hashes) and hashes[j] not in self.owner]
            kept = list(self.held)
            for _, r in store:
                kept[r] += 1
            in_use = set(hashes)
            victims = (h for h in list(self.owner) if h not in in_use and not self.pins[h])
            while any(k > self.capacity for k in kept):
                victim = next(victims, None)
                if victim is not None:
                    kept[self.owner[victim]] -= 1
                    self._evict(victim)
                else:
                    kept[store.pop()[1]] -= 1
            for j, r in store:
                self.owner[hashes[j]] = r
                self.held[r] += 1
                self._changes[hashes[j]] = True
            for h in reversed(hashes):  # deepest first: a parent ends up more recent than its children
                if h in self.owner:
                    self.owner.move_to_end(h)
            return tuple((j, r, hashes[j]) for j, r in store)

    def take_evictions(self) -> tuple[bytes, ...]:
        """Blocks evicted since the last call: the ranks free them before anything else."""
        evicted, self._evicted = tuple(self._evicted), []
        return evicted

    def take_changes(self) -> tuple[list[bytes], list[bytes]]:
        """Block hashes stored and evicted since the last call (a hash's latest change wins)."""
        with self._lock:
            changes, self._changes = self._changes, {}
        return [h for h, s in changes.items() if s], [h for h, s in changes.items() if not s]

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(tuple(self.held), self.capacity, self.lookups, self.hits, self.hit_tokens)

    def clear(self) -> None:
        """Forget every block (the ranks free theirs with ``RankBlocks.clear``); they count as
        evicted. Only with no request in flight."""
        with self._lock:
            for h in self.owner:
                self._changes[h] = False
            self.owner.clear()
            self.held = [0] * self.world


@dataclass
class RankSeq:
    """One request on one rank: its CP sequence, and which prompt block each new local block holds."""

    seq: CPSequence
    num_hit: int  # this rank's blocks of the cached prefix, first in the block table
    prompt_blocks: list[int] = field(default_factory=list)  # of the new blocks computed so far, in order


class RankBlocks:
    """One rank's share of the cache: the physical block of each cached block it holds."""

    def __init__(self, cache: KVCache, rank: int, world: int):
        self.cache, self.rank, self.world = cache, rank, world
        self.blocks: dict[bytes, int] = {}  # hash -> block id in ``cache``

    def evict(self, hashes: Sequence[bytes]) -> None:
        """Free the cached blocks the leader evicted that this rank holds."""
        self.cache.allocator.free([self.blocks.pop(h) for h in hashes if h in self.blocks])

    def begin(self, start: CacheStart) -> RankSeq:
        """A request's sequence on this rank: its blocks of the cached prefix (read-only, in
        prompt order), then the blocks for its new tokens, all allocated now."""
        table = [self.blocks[h] for h in start.hit if h in self.blocks]
        new = self.cache.allocator.allocate(start.new_blocks[self.rank])
        bs = self.cache.block_size
        seq = CPSequence(table + new, num_cached_local=len(table) * bs, num_done=len(start.hit) * bs)
        return RankSeq(seq, len(table))

    def finish(self, rs: RankSeq, store: Sequence[tuple[int, int, bytes]]) -> None:
        """Keep the new blocks the leader stores on this rank; free the request's other new blocks
        (the cached prefix's blocks stay with the cache)."""
        new = rs.seq.block_table[rs.num_hit :]
        by_prompt_block = dict(zip(rs.prompt_blocks, new))
        kept = set()
        for j, rank, h in store:
            if rank == self.rank:
                self.blocks[h] = by_prompt_block[j]
                kept.add(by_prompt_block[j])
        self.cache.allocator.free([b for b in new if b not in kept])
        rs.seq.block_table = []

    def clear(self) -> None:
        """Free every cached block of this rank."""
        self.cache.allocator.free(list(self.blocks.values()))
        self.blocks = {}
