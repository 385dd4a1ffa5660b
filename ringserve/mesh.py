"""A group's device mesh (torchtitan's DeviceMesh, small): world ranks laid out as TP x CP or TP x KVP.

TP is the inner dimension: world rank ``r`` is TP rank ``r % tp`` of CP (or KVP) rank ``r // tp``,
so the ranks of one TP group are consecutive (one host, as in the paper's TP8 x CP16) and world
rank 0, the group's leader, is TP rank 0 of CP rank 0. Each rank belongs to one TP group (the
ranks of its CP/KVP index: the model's all-reduces) and one CP/KVP group (the ranks of its TP
index: ring attention, or the KVP all-gather, over the heads they share).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ringserve.errors import FailedPrecondition


@dataclass(frozen=True)
class Layout:
    """A group's parallel layout: ``tp`` ranks per TP group, ``outer`` CP (or KVP) ranks."""

    tp: int = 1
    outer: int = 1

    def __post_init__(self):
        if self.tp < 1 or self.outer < 1:
            raise FailedPrecondition(f"a layout needs TP and CP/KVP sizes of at least 1, got {self.tp} x {self.outer}")

    @property
    def world(self) -> int:
        return self.tp * self.outer

    def tp_index(self, rank: int) -> int:
        return rank % self.tp

    def outer_index(self, rank: int) -> int:
        return rank // self.tp

    def tp_ranks(self, outer_index: int) -> list[int]:
        """The world ranks of CP/KVP rank ``outer_index``'s TP group."""
        return [outer_index * self.tp + t for t in range(self.tp)]

    def outer_ranks(self, tp_index: int) -> list[int]:
        """The world ranks of TP index ``tp_index``'s CP/KVP group."""
        return [o * self.tp + tp_index for o in range(self.outer)]


@dataclass(frozen=True)
class Mesh:
    """One rank's place in its group's layout and the two process groups it belongs to (None: the
    default group, when that group is the whole world)."""

    layout: Layout
    rank: int
    tp_group: dist.ProcessGroup | None
    outer_group: dist.ProcessGroup | None

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_index(self.rank)

    @property
    def outer_rank(self) -> int:
        return self.layout.outer_index(self.rank)


def init_mesh(layout: Layout) -> Mesh:
    """This rank's mesh over the initialized default group, which must have ``layout.world`` ranks.

    Every rank makes every group, in the same order (``torch.distributed.new_group`` requires it);
    a dimension spanning the whole world uses the default group, so a TP 1 or CP 1 layout makes
    no new communicator."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != layout.world:
        raise FailedPrecondition(
            f"the group has {world} ranks but the layout TP {layout.tp} x {layout.outer} needs {layout.world}"
        )
    tp_groups = [_group(layout.tp_ranks(o), world) for o in range(layout.outer)]
    outer_groups = [_group(layout.outer_ranks(t), world) for t in range(layout.tp)]
    return Mesh(layout, rank, tp_groups[layout.outer_index(rank)], outer_groups[layout.tp_index(rank)])


def _group(ranks: list[int], world: int) -> dist.ProcessGroup | None:
    return None if len(ranks) == world else dist.new_group(ranks)
