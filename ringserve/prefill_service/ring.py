"""Exact ring attention over a CP group: pass-KV and pass-Q (Yang et al. 2024, §3.4-3.5).

Each rank holds, for each sequence of a pass, a KV buffer laid out as [cached | early piece |
late piece] (``sharding.PassPlan``) and the queries of its two pieces; a pass may pack several
sequences (``RingLayout``). Both variants run N steps around the
ring, attend with the one attention primitive and merge partials by LSE:

- pass-KV: KV buffers travel; each rank attends its own queries to every rank's KV.
- pass-Q: queries travel; each rank attends every rank's queries to its own KV, then an
  all-to-all returns the partial outputs to their owners, who merge them.

The send/receive of the next step is posted before the current step's attention, so transfer
hides behind compute (on GPU, NCCL runs it on its own stream).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringserve.engine.attention import attend, merge
from ringserve.errors import Unavailable
from ringserve.prefill_service.sharding import PassPlan


class RingComm:
    """Post a send to the next rank and a receive from the previous one; wait later."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world) if group else (self.rank + 1) % self.world
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world) if group else (self.rank - 1) % self.world
        self._pending: list = []

    def send_recv(self, send: torch.Tensor) -> torch.Tensor:
        """Start sending ``send`` onward; returns the buffer the previous rank's tensor lands in."""
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group),
            dist.P2POp(dist.irecv, recv, self.prev, self.group),
        ]
        self._pending = dist.batch_isend_irecv(ops)
        return recv

    def wait(self) -> None:
        with self.peer_errors():
            for work in self._pending:
                work.wait()
        self._pending = []

    @contextmanager
    def peer_errors(self):
        """Turn a collective that failed because a peer died or timed out into ``Unavailable``."""
        try:
            yield
        except (dist.DistError, RuntimeError) as e:
            raise Unavailable(f"CP rank {self.rank}: a peer rank failed or timed out ({e})") from e


@dataclass(frozen=True)
class SeqLayout:
    """One sequence of a pass: its piece plan and each rank's KV from its earlier passes."""

    plan: PassPlan
    cached: tuple[int, ...]  # per rank: KV from earlier passes of this sequence

    def kv_len(self, rank: int) -> int:
        return self.cached[rank] + self.plan.rank_len(rank)

    def piece_len(self, piece: int) -> int:
        start, end = self.plan.pieces[piece]
        return end - start

    def visible(self, q_piece: int, kv_rank: int) -> tuple[int, bool]:
        """(end, causal): queries of piece ``q_piece`` see ``kv_rank``'s buffer [0, end).

        Cached KV precedes every new token, so it is always visible. A new piece is fully
        visible if it comes before the query piece, seen causally if it is the query piece, and
        not at all after it; since the buffer is in token order, that is always a prefix of it,
        with the causal diagonal (bottom-right aligned) at its end.
        """
        early, late = self.plan.rank_pieces(kv_rank)
        end = self.cached[kv_rank]
        if early <= q_piece:
            end += self.piece_len(early)
            if late <= q_piece:
                return end + self.piece_len(late), late == q_piece
            return end, early == q_piece
        return end, False


@dataclass(frozen=True)
class RingLayout:
    """What every rank knows about a pass: its sequences, each sharded on its own.

    A packed pass (several sequences) lays them out one after another on every rank: queries in
    sequence order, and each rank's KV buffer as [seq 0's cached + new | seq 1's | ...]. Attention
    is block-diagonal: a sequence's queries see only its own KV, so a short request packed with
    others computes exactly what it would alone.
    """

    seqs: tuple[SeqLayout, ...]

    def q_len(self, rank: int) -> int:
        return sum(s.plan.rank_len(rank) for s in self.seqs)

    def kv_len(self, rank: int) -> int:
        return sum(s.kv_len(rank) for s in self.seqs)

    def split_q(self, q: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """``rank``'s packed queries (or per-query rows), one view per sequence."""
        return list(q.split([s.plan.rank_len(rank) for s in self.seqs]))

    def split_kv(self, kv: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """``rank``'s packed KV buffer (padding after it ignored), one view per sequence."""
        lengths = [s.kv_len(rank) for s in self.seqs]
        return list(kv[: sum(lengths)].split(lengths))


def _attend_pieces(q, keys, values, layout: RingLayout, q_rank: int, kv_rank: int):
    """Attention of ``q_rank``'s queries (per sequence: its two pieces, concatenated) over
    ``kv_rank``'s KV (``keys``/``values``: one tensor per sequence)."""
    outs, lses = [], []
    for seq, q_seq, k, v in zip(layout.seqs, layout.split_q(q, q_rank), keys, values):
        offset = 0
        for piece in seq.plan.rank_pieces(q_rank):
            n = seq.piece_len(piece)
            end, causal = seq.visible(piece, kv_rank)
            out, lse = attend(q_seq[offset : offset + n], k[:end], v[:end], causal=causal)
            outs.append(out)
            lses.append(lse)
            offset += n
    return torch.cat(outs), torch.cat(lses)


def ring_pass_kv(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], layout: RingLayout, comm: RingComm
) -> torch.Tensor:
    """This rank's attention output [T_r, H, D], with every rank's KV visiting in turn.

    ``q`` holds this rank's queries of every sequence of the pass, packed; ``keys``/``values``
    this rank's KV of each sequence ([cached | new], one tensor per sequence)."""
    rank, world = comm.rank, comm.world
    # One message per step: K and V side by side, every sequence's in turn, padded to the longest
    # rank (padding never read).
    kv = keys[0].new_empty(max(layout.kv_len(r) for r in range(world)), 2, *keys[0].shape[1:])
    for buf, k, v in zip(layout.split_kv(kv, rank), keys, values):
        buf[:, 0] = k
        buf[:, 1] = v
    out = lse = None
    for step in range(world):
        src = (rank - step) % world
        if step + 1 < world:
            incoming = comm.send_recv(kv)
        bufs = layout.split_kv(kv, src)
        part = _attend_pieces(q, [b[:, 0] for b in bufs], [b[:, 1] for b in bufs], layout, rank, src)
        out, lse = (part[0].float(), part[1]) if out is None else merge(out, lse, *part)
        if step + 1 < world:
            comm.wait()
            kv = incoming
    return out.to(q.dtype)


def ring_pass_q(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], layout: RingLayout, comm: RingComm
) -> torch.Tensor:
    """This rank's attention output [T_r, H, D], with every rank's queries visiting this KV
    (arguments as for ``ring_pass_kv``)."""
    rank, world = comm.rank, comm.world
    rows = max(layout.q_len(r) for r in range(world))
    q_buf = q.new_empty(rows, *q.shape[1:])
    q_buf[: q.shape[0]] = q
    # Row i of part_*[src] is written for every i below src's query count, and no other row is read.
    part_out = q.new_empty(world, rows, *q.shape[1:])
    part_lse = q.new_empty(world, rows, q.shape[1], dtype=torch.float32)
    for step in range(world):
        src = (rank - step) % world  # whose queries are visiting
        if step + 1 < world:
            incoming = comm.send_recv(q_buf)
        n = layout.q_len(src)
        o, s = _attend_pieces(q_buf[:n], keys, values, layout, src, rank)
        part_out[src, :n] = o
        part_lse[src, :n] = s
        if step + 1 < world:
            comm.wait()
            q_buf = incoming
    if world > 1:  # return each partial to the owner of its queries
        recv_out, recv_lse = torch.empty_like(part_out), torch.empty_like(part_lse)
        with comm.peer_errors():
            dist.all_to_all_single(recv_out, part_out, group=comm.group)
            dist.all_to_all_single(recv_lse, part_lse, group=comm.group)
        part_out, part_lse = recv_out, recv_lse
    n = q.shape[0]
    out, lse = part_out[0, :n].float(), part_lse[0, :n]
    for r in range(1, world):
        out, lse = merge(out, lse, part_out[r, :n], part_lse[r, :n])
    return out.to(q.dtype)
