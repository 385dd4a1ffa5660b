"""Paged KV cache: fixed-size blocks, a block allocator with counters, and the chained block hash.

A sequence's KV lives in whole blocks listed by its block table; cache index ``i`` of the
sequence sits in block ``table[i // block_size]`` at offset ``i % block_size``. Keys are stored
after the rotary embedding, so a block's contents do not depend on where it is read from
(which is what lets prefill shards move to any decode layout, see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ringserve.engine.attention import attend_packed
from ringserve.engine.config import ModelConfig
from ringserve.engine.kernels import store_kv, use_kernel
from ringserve.errors import InvalidArgument, ResourceExhausted

DEFAULT_BLOCK_SIZE = 64


def block_hashes(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, parent: bytes = b"") -> list[bytes]:
    """Chained content hashes of the full blocks of ``token_ids`` (a trailing partial block has none).

    Block n's hash covers the hash of block n-1 and its own token ids, so equal hashes mean equal
    prefixes. blake2b, never Python's ``hash()``: the router and every worker must agree.
    """
    hashes = []
    prev = parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        prev = hashlib.blake2b(prev + struct.pack(f"<{block_size}I", *block), digest_size=16).digest()
        hashes.append(prev)
    return hashes


class BlockAllocator:
    """Hands out block ids in runs of consecutive ids; ``num_used`` returns to zero when every
    request is done.

    A sequence whose blocks form one run is read in place rather than gathered (``KVCache.read``)
    and moves in one transfer descriptor per layer and K/V; a pool that has served mixed traffic
    for hours must still hand out runs (docs/ARCHITECTURE.md, "KV transfer"). So the free blocks
    are kept as maximal runs, freed blocks merge with their free neighbours, and ``allocate(n)``
    takes the shortest free run that holds ``n`` (its low end); when none does, the longest runs
    whole until the rest fits one: the fewest runs there can be. Single blocks (a decoding
    sequence's growth) thus fill the smallest holes first and leave long runs whole.
    """

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise InvalidArgument(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._num_free = 0
        self._runs: dict[int, int] = {}  # free run start -> length
        self._ends: dict[int, int] = {}  # free run end (exclusive) -> start
        self._by_length: list[tuple[int, int]] = []  # (length, start) of every free run, sorted
        self._used: set[int] = set()
        self._add_run(0, num_blocks)

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return len(self._used)

    def free_runs(self) -> list[range]:
        """The free blocks as maximal runs, lowest first."""
        return [range(start, start + n) for start, n in sorted(self._runs.items())]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks, all or none, in as few runs as the free blocks allow."""
        if n > self._num_free:
            raise ResourceExhausted(
                f"KV cache full: {n} blocks needed, {self._num_free} of {self.num_blocks} free; "
                "retry later, shorten the request, or give the worker more KV memory"
            )
        blocks: list[int] = []
        while len(blocks) < n:
            want = n - len(blocks)
            i = min(bisect.bisect_left(self._by_length, (want, -1)), len(self._by_length) - 1)
            length, start = self._by_length[i]
            take = min(want, length)
            self._remove_run(start, length)
            if take < length:
                self._add_run(start + take, length - take)
            blocks.extend(range(start, start + take))
        self._used.update(blocks)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Return blocks, all or none; freeing a block that is not in use is a bug and raises."""
        seen: set[int] = set()
        for b in blocks:
            if b not in self._used or b in seen:
                raise ValueError(f"block {b} freed twice or never allocated")
            seen.add(b)
        self._used.difference_update(blocks)
        for run in as_runs(sorted(blocks)):
            start, stop = run.start, run.stop
            if stop in self._runs:  # merge with the free run right after
                stop += self._runs[stop]
                self._remove_run(run.stop, stop - run.stop)
            if start in self._ends:  # and the one right before
                start = self._ends[start]
                self._remove_run(start, run.start - start)
            self._add_run(start, stop - start)

    def _add_run(self, start: int, length: int) -> None:
        self._runs[start] = length
        self._ends[start + length] = start
        bisect.insort(self._by_length, (length, start))
        self._num_free += length

    def _remove_run(self, start: int, length: int) -> None:
        del self._runs[start], self._ends[start + length]
        del self._by_length[bisect.bisect_left(self._by_length, (length, start))]
        self._num_free -= length


def as_runs(block_table: Sequence[int]) -> list[range]:
    """A block table as its runs of consecutive ids, in table order."""
    runs: list[range] = []
    for b in block_table:
        if runs and runs[-1].stop == b:
            runs[-1] = range(runs[-1].start, b + 1)
        else:
            runs.append(range(b, b + 1))
    return runs


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Whole blocks that hold ``num_tokens``."""
    return -(-num_tokens // block_size)


def as_run(block_table: Sequence[int]) -> range | None:
    """The block table as a ``range`` if its blocks are consecutive ids (a run), else None."""
    if block_table and block_table[-1] - block_table[0] == len(block_table) - 1:
        run = range(block_table[0], block_table[-1] + 1)
        if list(block_table) == list(run):
            return run
    return None


class KVCache:
    """The KV store of one worker: per layer, K and V as [num_blocks + 1, block_size, Hkv, D].

    The extra block is scratch that no allocator hands out: writes that must go nowhere (the rows
    of a fixed-shape batch that another rank stores, or padding) land in ``scratch_slot``."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.scratch_slot = num_blocks * block_size
        shape = (
            config.num_hidden_layers,
            num_blocks + 1,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
        )
        # empty, not zeros: pages are committed only as blocks get used, and every slot is
        # written before it is read.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        layers, _, _, heads, dim = self.k.shape
        return 2 * layers * heads * dim * self.k.element_size()

    def table(self, block_table: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """A block table as a tensor on the cache's device. Build it once per forward: each
        host-to-device copy stalls the GPU stream."""
        if isinstance(block_table, torch.Tensor):
            return block_table
        return torch.tensor(block_table, dtype=torch.long).to(self.k.device, non_blocking=True)

    def slots(self, block_table: Sequence[int] | torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Flat slot indices of cache positions [start, end) of a sequence."""
        table = self.table(block_table)
        idx = torch.arange(start, end, device=table.device)
        return table[idx // self.block_size] * self.block_size + idx % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K and V ([T, Hkv, D]) at flat slots."""
        if use_kernel(k) and k.stride(-1) == v.stride(-1) == 1:
            store_kv(self.k[layer], self.v[layer], slots, k, v)
            return
        flat_k = self.k[layer].view(-1, *self.k.shape[-2:])
        flat_v = self.v[layer].view(-1, *self.v.shape[-2:])
        flat_k.index_copy_(0, slots, k.to(flat_k.dtype))
        flat_v.index_copy_(0, slots, v.to(flat_v.dtype))

    def read(
        self, layer: int, block_table: Sequence[int] | torch.Tensor | range, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` cached tokens of a sequence as contiguous K, V [length, Hkv, D].

        A ``range`` table (a run of consecutive blocks, ``as_run``) is read in place: views, no copy."""
        if isinstance(block_table, range):
            blocks = slice(block_table.start, block_table.start + blocks_needed(length, self.block_size))
            return self.k[layer, blocks].flatten(0, 1)[:length], self.v[layer, blocks].flatten(0, 1)[:length]
        table = self.table(block_table)[: blocks_needed(length, self.block_size)]
        k = self.k[layer].index_select(0, table).flatten(0, 1)[:length]
        v = self.v[layer].index_select(0, table).flatten(0, 1)[:length]
        return k, v


@dataclass
class SeqSpan:
    """One sequence's new tokens in a flat batch: rows [start, end), going to cache positions
    [cached, cached + end - start) of the sequence's block table."""

    start: int
    end: int
    block_table: list[int]
    cached: int


class PagedAttention:
    """The single-device ``AttentionFn``: store new K/V in the paged cache, attend over all of it."""

    def __init__(self, cache: KVCache, spans: list[SeqSpan]):
        self.cache = cache
        self.spans = spans
        self.tables = [cache.table(s.block_table) for s in spans]
        self.slots = torch.cat(
            [cache.slots(t, s.cached, s.cached + s.end - s.start) for s, t in zip(spans, self.tables)]
        )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.slots, k, v)
        kv = [self.cache.read(layer, t, s.cached + s.end - s.start) for s, t in zip(self.spans, self.tables)]
        q_lens = [s.end - s.start for s in self.spans]
        return attend_packed(q, [k for k, _ in kv], [v for _, v in kv], q_lens)[0]
