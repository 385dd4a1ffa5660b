"""One rank of a KV-parallel (KVP) decode group: its shards of requests' KV and its part of a step.

Medha's KV parallelism: a request's KV cache is a set of (key, value) rows (RoPE is applied
before caching), so it can be split over K ranks in any way. Every rank holds the full weights
(or, under TP x KVP, its TP shard: the KVP group is then the ranks of one TP index, holding the
same heads) and runs the whole model on the step's tokens; in attention each rank attends the new queries to
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
from ringserve.kv_transfer.tcp import Frame, store_rows

# all_gather_into_tensor was renamed all_gather_single in torch 2.12; the GPU image has 2.11.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Shard:
    """This rank's part of one reservation (``epoch``): its blocks, how many rows they hold, and
    which prompt positions [prompt_start, prompt_start + prompt_len) the prefill tier writes here.
    Decoding starts only once the leader has counted every prompt row landed, so ``length``
    starts at the whole share."""

    epoch: int
    block_table: list[int]
    prompt_start: int
    prompt_len: int
    length: int = 0  # rows stored: the prompt share, then generated tokens

    def __post_init__(self):
        self.length = self.length or self.prompt_len


@dataclass(frozen=True)
class StepEntry:
    """One request's token in a decode step; ``owner`` is the rank that stores its K and V."""

    request_id: str
    token_id: int
    position: int
    owner: int


class KVPRank:
    """A rank's model, KV cache and shards; ``step`` runs its part of a decode step. The leader
    counts landed rows (one counter per request, ``DecodeWorker``); a rank only stores what a TCP
    sender brings, for a reservation it holds."""

    def __init__(
        self,
        model: Llama,
        cache: KVCache,
        rank: int = 0,
        world: int = 1,
        landing_timeout_s: float = 10.0,
        use_graphs: bool = True,
        group: dist.ProcessGroup | None = None,
    ):
        """``rank`` of ``world``: this rank's place in the KVP ``group`` (None: the default group);
        under TP x KVP (``ringserve.mesh``) the group is the ranks of this TP index, which hold
        the same heads."""
        self.model, self.cache = model, cache
        self.rank, self.world, self.group = rank, world, group
        self.device = cache.k.device
        self.landing_timeout_s = landing_timeout_s
        self.shards: dict[str, Shard] = {}
        self._latest_epoch = 0  # the newest reservation this rank has seen (epochs only grow)
        self.lock = threading.Condition()
        self._batch: tuple | None = None  # (key, block tables, shards) of the last batch
        # CUDA graphs where the step runs the Triton kernel (half precision on a GPU).
        half = cache.k.dtype in (torch.float16, torch.bfloat16)
        self.graphs = StepGraphs(self) if self.device.type == "cuda" and half and use_graphs else None

    def reserve(self, request_id: str, epoch: int, block_table: list[int], prompt_start: int, prompt_len: int) -> None:
        """Take a request's share of reservation ``epoch``."""
        with self.lock:
            self.shards[request_id] = Shard(epoch, block_table, prompt_start, prompt_len)
            self._latest_epoch = max(self._latest_epoch, epoch)
            self.lock.notify_all()

    def extend(self, request_id: str, blocks: list[int]) -> None:
        """More blocks for a request's generated tokens (the leader grows a shard as it decodes)."""
        with self.lock:
            shard = self.shards[request_id]
            shard.block_table = shard.block_table + blocks

    def free(self, request_id: str, epoch: int) -> None:
        """End reservation ``epoch`` of a request here (a later one under the same id stays)."""
        with self.lock:
            shard = self.shards.get(request_id)
            if shard is not None and shard.epoch == epoch:
                del self.shards[request_id]
            self._latest_epoch = max(self._latest_epoch, epoch)

    def admit(self, frame: Frame) -> None:
        """Check a TCP frame's header against the reservation it claims, before its payload is
        read: a live reservation of that epoch on this rank, rows inside its share, and exactly
        the bytes those rows take. Waits briefly for a reservation this rank has not heard of yet
        (the leader's message may still be on its way); raises NotFound / InvalidArgument."""
        deadline = time.monotonic() + self.landing_timeout_s
        with self.lock:
            while (shard := self._shard(frame.request_id, frame.epoch)) is None:
                ended = frame.epoch <= self._latest_epoch  # epochs only grow: this one is over
                if ended or not self.lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise NotFound(
                        f"no reservation for request {frame.request_id} (epoch {frame.epoch}) on decode "
                        f"rank {self.rank}: it ended, expired, or was never made here"
                    )
            local = frame.first_position - shard.prompt_start
            if local < 0 or local + frame.count > shard.prompt_len:
                raise InvalidArgument(
                    f"KV rows [{frame.first_position}, {frame.first_position + frame.count}) are outside decode "
                    f"rank {self.rank}'s share [{shard.prompt_start}, {shard.prompt_start + shard.prompt_len}) "
                    f"of request {frame.request_id}"
                )
        frame.check_fits(self.cache)

    def write_kv(self, frame: Frame, kv: torch.Tensor) -> int:
        """Store an admitted frame's prompt rows [layers, 2, n, heads, D]; returns their first
        position in this rank's share. The write holds the lock, so a reservation that ends
        meanwhile is freed only after it (never a write into blocks handed to someone else)."""
        with self.lock:
            shard = self._shard(frame.request_id, frame.epoch)
            if shard is None:
                raise NotFound(f"request {frame.request_id} (epoch {frame.epoch}) ended while its KV was arriving")
            local = frame.first_position - shard.prompt_start
            store_rows(self.cache, self.cache.slots(shard.block_table, local, local + frame.count), kv, frame.heads)
        return local

    def _shard(self, request_id: str, epoch: int) -> Shard | None:
        shard = self.shards.get(request_id)
        return shard if shard is not None and shard.epoch == epoch else None

    @torch.inference_mode()
    def step(self, entries: list[StepEntry], group_wide: bool, prev: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run one decode step; returns the logits [B, V] on rank 0. ``group_wide``: every rank
        runs this step (False only when all of the step's requests live on this rank alone).
        ``prev``: the picks [B', 2] of the step before, still on the device; an entry's token id
        -1 - j stands for its row j (the leader alone, which launches a step before it has read
        the one before: ``DecodeWorker._step``).

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
            return self.graphs.replay(rows, self._tables(entries, shards), gather, prev)
        ids, positions, write_slots = (torch.tensor(r).to(self.device) for r in rows[:3])
        if prev is not None:
            take_tokens(ids, prev)
        batch = DecodeBatch.build(self._tables(entries, shards), lengths)
        return self.forward(ids, positions, KVPAttention(self.cache, batch, write_slots, gather, self.group))

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
            # Keep the shards alive with the key, so their ids cannot be reused by new ones. Not
            # blocking: a blocking copy would wait for the step in flight (DecodeWorker._step).
            table = torch.tensor(rows, dtype=torch.int32).to(self.device, non_blocking=True)
            self._batch = (key, table, shards)
        return self._batch[1]


def take_tokens(ids: torch.Tensor, prev: torch.Tensor) -> None:
    """Fill in, in place, the token ids -1 - j with row j's token of ``prev`` [B', 2]."""
    src = (-1 - ids).clamp(0, prev.shape[0] - 1)
    ids.copy_(torch.where(ids < 0, prev[src, 0], ids))


class StepGraphs:
    """CUDA graphs of a rank's decode step, one per (padded batch size, group-wide), with the
    static input buffers they read: token ids, positions, write slots, lengths and block tables."""

    def __init__(self, rank: KVPRank):
        self.rank = rank
        self.width = rank.cache.allocator.num_blocks  # the most blocks a request can have here
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, object]] = {}

    def replay(
        self, rows: list[list[int]], tables: torch.Tensor, gather: bool, prev: torch.Tensor | None
    ) -> torch.Tensor | None:
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
        if prev is not None:
            take_tokens(io[0, :n], prev)
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
            return rank.forward(io[0], io[1], KVPAttention(rank.cache, batch, io[2], gather, rank.group))

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

    def __init__(
        self,
        cache: KVCache,
        batch: DecodeBatch,
        write_slots: torch.Tensor,
        gather: bool,
        group: dist.ProcessGroup | None = None,
    ):
        self.cache, self.batch, self.write_slots, self.gather, self.group = cache, batch, write_slots, gather, group

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.write_slots, k, v)
        out, lse = decode_attention(self.cache, layer, q, self.batch)
        if self.gather:
            out = gather_and_merge(out, lse, self.group)
        return out


def gather_and_merge(out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather every KVP rank's partial (out [B, H, D], lse [B, H]: this TP rank's heads) over
    ``group`` and merge them by LSE. The merge runs in rank order on every rank, so all ranks get
    bit-identical outputs."""
    world = dist.get_world_size(group)
    packed = torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1)  # one message: [B, H, D + 1]
    gathered = torch.empty((world * packed.shape[0], *packed.shape[1:]), dtype=packed.dtype, device=packed.device)
    try:
        all_gather_single(gathered, packed, group=group)
    except (dist.DistError, RuntimeError) as e:
        raise Unavailable(f"KVP decode: a peer rank failed or timed out ({e})") from e
    rows = gathered.view(world, -1, packed.shape[-1]).transpose(0, 1)  # [B * H, world, D + 1]
    merged, _ = merge_partials(rows[..., :-1], rows[..., -1])
    return merged.view(out.shape).to(out.dtype)
