"""One rank of a KV-parallel (KVP) decode group: its shards of requests' KV and its part of a step.

Medha's KV parallelism: a request's KV cache is a set of (key, value) rows (RoPE is applied
before caching), so it can be split over K ranks in any way. Every rank holds the full weights
and runs the whole model on the step's tokens; in attention each rank attends the new queries to
the rows it holds (``decode_attention``), the group all-gathers the partial outputs and their
log-sum-exps (a few KB per token per layer) and every rank merges them into the exact result.
The new token's K and V are stored on one rank, the step's ``owner`` for that request.

The leader (rank 0) decides everything (which blocks, which owner) and sends the same plan to
every rank, so the ranks' states never diverge and never need to agree among themselves.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringserve.engine.kv_cache import KVCache
from ringserve.engine.model import Llama
from ringserve.engine.paged_decode import DecodeBatch, decode_attention, merge_partials
from ringserve.errors import InvalidArgument, NotFound, Unavailable

# all_gather_into_tensor was renamed all_gather_single in torch 2.12; the GPU image has 2.11.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Shard:
    """This rank's part of one request: its blocks, how many rows they hold, and which prompt
    positions [prompt_start, prompt_start + prompt_len) the prefill tier writes here."""

    block_table: list[int]
    prompt_start: int
    prompt_len: int
    length: int = 0  # rows stored: landed prompt rows, then generated tokens
    landed: int = 0


@dataclass(frozen=True)
class StepEntry:
    """One request's token in a decode step; ``owner`` is the rank that stores its K and V."""

    request_id: str
    token_id: int
    position: int
    owner: int


class KVPRank:
    """A rank's model, KV cache and shards; ``step`` runs its part of a decode step."""

    def __init__(
        self,
        model: Llama,
        cache: KVCache,
        rank: int = 0,
        world: int = 1,
        landing_timeout_s: float = 10.0,
        use_graphs: bool = True,
    ):
        self.model, self.cache = model, cache
        self.rank, self.world = rank, world
        self.device = cache.k.device
        self.landing_timeout_s = landing_timeout_s
        self.shards: dict[str, Shard] = {}
        self._early: dict[str, list[tuple[float, int, int]]] = {}  # rows that landed before their reservation
        self.lock = threading.Condition()
        self._batch: tuple | None = None  # (key, block tables, shards) of the last batch
        # CUDA graphs where the step runs the Triton kernel (half precision on a GPU).
        half = cache.k.dtype in (torch.float16, torch.bfloat16)
        self.graphs = StepGraphs(self) if self.device.type == "cuda" and half and use_graphs else None

    def reserve(self, request_id: str, block_table: list[int], prompt_start: int, prompt_len: int) -> int:
        """Take a request's share; returns the rows that had landed already (a NIXL sender can
        finish before the leader's message reaches this rank: see ``note_landed``)."""
        with self.lock:
            shard = self.shards[request_id] = Shard(block_table, prompt_start, prompt_len)
            self.lock.notify_all()
            early = self._early.pop(request_id, [])
            stale = time.monotonic() - 10 * self.landing_timeout_s
            self._early = {rid: notes for rid, notes in self._early.items() if notes[-1][0] > stale}
            for _, start, count in early:
                shard.landed += count
                shard.length = max(shard.length, start + count)
            return sum(count for _, _, count in early)

    def extend(self, request_id: str, blocks: list[int]) -> None:
        """More blocks for a request's generated tokens (the leader grows a shard as it decodes)."""
        with self.lock:
            shard = self.shards[request_id]
            shard.block_table = shard.block_table + blocks

    def free(self, request_id: str) -> None:
        with self.lock:
            self.shards.pop(request_id, None)
            self._early.pop(request_id, None)

    def write_kv(self, request_id: str, first_position: int, kv: torch.Tensor) -> int:
        """Store prompt rows [layers, 2, n, Hkv, D] for positions first_position.. of a request;
        returns n. Waits briefly for the reservation: the leader's message may still be on its way."""
        deadline = time.monotonic() + self.landing_timeout_s
        with self.lock:
            while (shard := self.shards.get(request_id)) is None:
                if not self.lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise NotFound(f"no reservation for request {request_id} on decode rank {self.rank}")
            n = kv.shape[2]
            local = first_position - shard.prompt_start
            if local < 0 or local + n > shard.prompt_len:
                raise InvalidArgument(
                    f"KV rows [{first_position}, {first_position + n}) are outside decode rank {self.rank}'s "
                    f"share [{shard.prompt_start}, {shard.prompt_start + shard.prompt_len}) of request {request_id}"
                )
            expected = (self.model.config.num_hidden_layers, 2, n, *self.cache.k.shape[-2:])
            if tuple(kv.shape) != expected:
                raise InvalidArgument(f"KV shape {tuple(kv.shape)} does not match this model's {expected}")
            slots = self.cache.slots(shard.block_table, local, local + n)
        kv = kv.to(self.device)
        for layer in range(kv.shape[0]):
            self.cache.write(layer, slots, kv[layer, 0], kv[layer, 1])
        return self.note_landed(request_id, local, n)

    def note_landed(self, request_id: str, local_start: int, count: int) -> int:
        """Rows [local_start, local_start + count) of this rank's share are in the cache (written
        by ``write_kv``, or by a NIXL sender straight into the blocks); returns the rows counted now,
        0 for a request not reserved here (yet: ``reserve`` counts them when it comes)."""
        with self.lock:
            shard = self.shards.get(request_id)
            if shard is None:  # counted when the reservation arrives (or dropped as stale)
                self._early.setdefault(request_id, []).append((time.monotonic(), local_start, count))
                return 0
            shard.landed += count
            shard.length = max(shard.length, local_start + count)
            return count

    @torch.inference_mode()
    def step(self, entries: list[StepEntry], group_wide: bool) -> torch.Tensor | None:
        """Run one decode step; returns the logits [B, V] on rank 0. ``group_wide``: every rank
        runs this step (False only when all of the step's requests live on this rank alone).

        The step has fixed shapes: every row's K and V are written, the rows this rank does not
        store (and padding) to the cache's scratch slot. So on a GPU it is captured once per
        batch size into a CUDA graph and replayed: a decode step launches ~1,500 kernels, whose
        launch cost alone would exceed the step's memory time."""
        with self.lock:
            shards = [self.shards.get(e.request_id) for e in entries]
        slots = []
        for e, shard in zip(entries, shards):
            if e.owner == self.rank:
                slots.append(self._slot(shard))
                shard.length += 1
            else:
                slots.append(self.cache.scratch_slot)
        lengths = [s.length if s is not None else 0 for s in shards]
        rows = [[e.token_id for e in entries], [e.position for e in entries], slots, lengths]
        gather = group_wide and self.world > 1
        if self.graphs is not None:
            return self.graphs.replay(rows, self._tables(entries, shards), gather)
        ids, positions, write_slots = (torch.tensor(r).to(self.device) for r in rows[:3])
        batch = DecodeBatch.build(self._tables(entries, shards), lengths)
        return self.forward(ids, positions, KVPAttention(self.cache, batch, write_slots, gather))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attention: KVPAttention) -> torch.Tensor | None:
        """The model over one token per row with KVP attention; logits on rank 0 only."""
        # Every rank computes the same hidden states; only rank 0 needs the logits.
        logits_at = None if self.rank == 0 else torch.empty(0, dtype=torch.long, device=self.device)
        logits = self.model(ids, positions, attention, logits_at)
        return logits if self.rank == 0 else None

    def _slot(self, shard: Shard) -> int:
        bs = self.cache.block_size
        return shard.block_table[shard.length // bs] * bs + shard.length % bs

    def _tables(self, entries: list[StepEntry], shards: list[Shard | None]) -> torch.Tensor:
        """The batch's block tables as one padded tensor, rebuilt only when the batch or a table
        changes (a million-token request has thousands of blocks: no per-step host work on them)."""
        key = tuple((id(s), len(s.block_table) if s is not None else 0) for s in shards)
        if self._batch is None or self._batch[0] != key:
            width = max([len(s.block_table) for s in shards if s is not None], default=1)
            tables = [s.block_table if s is not None else [] for s in shards]
            rows = [t + [0] * (width - len(t)) for t in tables]
            # Keep the shards alive with the key, so their ids cannot be reused by new ones.
            self._batch = (key, torch.tensor(rows, dtype=torch.int32).to(self.device), shards)
        return self._batch[1]


class StepGraphs:
    """CUDA graphs of a rank's decode step, one per (padded batch size, group-wide), with the
    static input buffers they read: token ids, positions, write slots, lengths and block tables."""

    def __init__(self, rank: KVPRank):
        self.rank = rank
        self.width = rank.cache.allocator.num_blocks  # the most blocks a request can have here
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, object]] = {}

    def replay(self, rows: list[list[int]], tables: torch.Tensor, gather: bool) -> torch.Tensor | None:
        n = len(rows[0])
        size = 1 << (n - 1).bit_length()  # batch sizes padded to powers of two: few graphs
        key = (size, gather)
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, gather)
        graph, io, static_tables, out = self.graphs[key]
        host = torch.zeros(4, size, dtype=torch.long)
        host[2] = self.rank.cache.scratch_slot  # padding rows write to scratch, see nothing
        host[:, :n] = torch.tensor(rows)
        io.copy_(host, non_blocking=True)
        static_tables[:n, : tables.shape[1]].copy_(tables)
        graph.replay()
        return None if out is None else out[:n]

    def _capture(self, size: int, gather: bool):
        rank = self.rank
        io = torch.zeros(4, size, dtype=torch.long, device=rank.device)
        io[2] = rank.cache.scratch_slot
        tables = torch.zeros(size, self.width, dtype=torch.int32, device=rank.device)

        def run():
            batch = DecodeBatch(tables, io[3].to(torch.int32))
            return rank.forward(io[0], io[1], KVPAttention(rank.cache, batch, io[2], gather))

        side = torch.cuda.Stream(rank.device)
        side.wait_stream(torch.cuda.current_stream(rank.device))
        with torch.cuda.stream(side):  # warm up (kernel selection, NCCL buffers) off the graph
            for _ in range(2):
                run()
        torch.cuda.current_stream(rank.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        return graph, io, tables, out


class KVPAttention:
    """The ``AttentionFn`` of a KVP decode step on one rank."""

    def __init__(self, cache: KVCache, batch: DecodeBatch, write_slots: torch.Tensor, gather: bool):
        self.cache, self.batch, self.write_slots, self.gather = cache, batch, write_slots, gather

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.write_slots, k, v)
        out, lse = decode_attention(self.cache, layer, q, self.batch)
        if self.gather:
            out = gather_and_merge(out, lse)
        return out


def gather_and_merge(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """All-gather every rank's partial (out [B, H, D], lse [B, H]) and merge them by LSE. The merge
    runs in rank order on every rank, so all ranks get bit-identical outputs."""
    world = dist.get_world_size()
    packed = torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1)  # one message: [B, H, D + 1]
    gathered = torch.empty((world * packed.shape[0], *packed.shape[1:]), dtype=packed.dtype, device=packed.device)
    try:
        all_gather_single(gathered, packed)
    except (dist.DistError, RuntimeError) as e:
        raise Unavailable(f"KVP decode: a peer rank failed or timed out ({e})") from e
    rows = gathered.view(world, -1, packed.shape[-1]).transpose(0, 1)  # [B * H, world, D + 1]
    merged, _ = merge_partials(rows[..., :-1], rows[..., -1])
    return merged.view(out.shape).to(out.dtype)
