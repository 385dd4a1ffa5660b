"""What a decode group's leader and its other ranks say to each other over the rank link.

Leader -> rank: one typed call on the rank's ``KVPRank`` (``apply``); rank 0 gets the same call
directly. Rank -> leader: ready (its KV receiver and NIXL landing template), rows that landed
(each TCP frame stored, each NIXL notification: the leader alone counts them), the prefill side's
"done", and failures."""

from __future__ import annotations

from dataclasses import dataclass

from ringserve.decode_service.kvp import KVPRank, StepEntry


@dataclass(frozen=True)
class Reserve:
    """Take a request's share of reservation ``epoch``."""

    request_id: str
    epoch: int
    block_table: list[int]
    prompt_start: int
    prompt_len: int

    def apply(self, rank: KVPRank) -> None:
        rank.reserve(self.request_id, self.epoch, self.block_table, self.prompt_start, self.prompt_len)


@dataclass(frozen=True)
class Free:
    """End reservation ``epoch`` of a request on the rank."""

    request_id: str
    epoch: int

    def apply(self, rank: KVPRank) -> None:
        rank.free(self.request_id, self.epoch)


@dataclass(frozen=True)
class Extend:
    """More blocks for a request's generated tokens."""

    request_id: str
    blocks: list[int]

    def apply(self, rank: KVPRank) -> None:
        rank.extend(self.request_id, self.blocks)


@dataclass(frozen=True)
class Step:
    """Run the rank's part of a decode step: group-wide, or (``group_wide`` False: the TP peers of
    the leader) a step of KVP rank 0 alone."""

    entries: list[StepEntry]
    group_wide: bool = True

    def apply(self, rank: KVPRank) -> None:
        rank.step(self.entries, group_wide=self.group_wide)


LeaderCall = Reserve | Free | Extend | Step


@dataclass(frozen=True)
class Ready:
    """A rank is up: where its KV receiver listens, and its NIXL landing template (None: TCP only)."""

    rank: int
    address: str
    template: object | None


@dataclass(frozen=True)
class RowsLanded:
    """Rows [first, first + count) of ``rank``'s share of reservation ``epoch`` landed, of the
    rank's local KV ``heads`` (None: whole rows)."""

    rank: int
    request_id: str
    epoch: int
    transfer_id: str
    first: int
    count: int
    heads: range | None = None


@dataclass(frozen=True)
class PrefillDone:
    """The prefill side writes nothing more for reservation ``epoch`` (its NIXL "done")."""

    request_id: str
    epoch: int


@dataclass(frozen=True)
class RankFailed:
    """A rank could not start, or failed: its error's code and message."""

    rank: int
    code: str
    message: str
