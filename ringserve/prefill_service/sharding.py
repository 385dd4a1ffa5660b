"""Load-balanced sharding of one prefill pass at KV-block granularity (Yang et al. 2024, §3.3).

The T new tokens of a pass are cut into 2N pieces of whole blocks; CP rank r holds pieces r and
2N-1-r, so under the causal mask every rank does about the same work. The last piece, which
holds the pass's last (possibly partial) block and so the token to sample from, belongs to rank
0, the leader. KV from earlier passes is not resharded: it stays on the rank that computed it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ringserve.engine.kv_cache import blocks_needed


@dataclass(frozen=True)
class PassPlan:
    """Where the new tokens of one pass go: ``pieces[i]`` is piece i's [start, end) in the pass."""

    num_new: int
    world: int
    pieces: tuple[tuple[int, int], ...]  # 2N pieces in token order

    def owner(self, piece: int) -> int:
        """The rank holding piece ``piece``."""
        return piece if piece < self.world else 2 * self.world - 1 - piece

    def rank_pieces(self, rank: int) -> tuple[int, int]:
        """The two piece indices rank ``rank`` holds, early one first."""
        return rank, 2 * self.world - 1 - rank

    def rank_tokens(self, rank: int) -> list[int]:
        """Indices (within the pass) of the new tokens rank ``rank`` holds, in its local order."""
        return [i for p in self.rank_pieces(rank) for i in range(*self.pieces[p])]

    def rank_len(self, rank: int) -> int:
        a, b = self.rank_pieces(rank)
        return sum(e - s for s, e in (self.pieces[a], self.pieces[b]))

    def rank_blocks(self, rank: int, block_size: int) -> list[int]:
        """Indices (within the pass) of the KV blocks rank ``rank`` holds, in its local order.

        Pieces start on block boundaries, so each of the rank's local blocks holds exactly one
        block of the pass (only the pass's last block, on rank 0, may be partial)."""
        return [
            b
            for p in self.rank_pieces(rank)
            for b in range(self.pieces[p][0] // block_size, blocks_needed(self.pieces[p][1], block_size))
        ]


def plan_pass(num_new: int, world: int, block_size: int) -> PassPlan:
    """Cut ``num_new`` tokens into 2N block-aligned pieces for a CP group of ``world`` ranks.

    Blocks are dealt to ranks as evenly as possible (the first ``nb % N`` ranks get one more),
    and each rank's blocks are split between its early and late piece, the late one taking the
    odd block. Works for any T: with fewer blocks than 2N some pieces are empty, and T = 1 puts
    the single token on rank 0.
    """
    if world < 1 or num_new < 0:
        raise ValueError(f"bad pass: num_new={num_new}, world={world}")
    nb = blocks_needed(num_new, block_size)
    per_rank = [nb // world + (1 if r < nb % world else 0) for r in range(world)]
    sizes = [0] * (2 * world)  # in blocks
    for r, count in enumerate(per_rank):
        sizes[r] = count // 2
        sizes[2 * world - 1 - r] = count - count // 2
    pieces, start = [], 0
    for size in sizes:
        end = min(start + size * block_size, num_new)
        pieces.append((start, end))
        start = end
    return PassPlan(num_new, world, tuple(pieces))


def chunk_blocks(plan: PassPlan, start: int, rank: int, block_size: int) -> list[int]:
    """The prompt blocks rank ``rank`` computes in a pass over the prompt's tokens from ``start``
    (block-aligned), in its local order. They depend on how the prompt was chunked, so the
    leader and each rank record them chunk by chunk."""
    return [start // block_size + b for b in plan.rank_blocks(rank, block_size)]
