"""The prefill group's pass protocol: what the gRPC front hands the leader (``Job``), what the
leader sends every rank each iteration (``Pass`` of ``ChunkWork``), and what each rank reports
back (``PassReport``; push results are ``push.PushResult``). Every block decision travels in the
pass, so every rank carries out the same one, in the same order."""

from __future__ import annotations

from dataclasses import dataclass

from ringserve.prefill_service.prefix_cache import CacheStart
from ringserve.prefill_service.push import Target


@dataclass(frozen=True)
class Job:
    """A request as the group takes it."""

    request_id: str
    token_ids: list[int]
    strategy: str
    targets: list[Target]  # where its KV goes; empty: nowhere (the prefill alone is wanted)
    ttft_s: float | None = None  # its time-to-first-token budget; None: the scheduler's default


@dataclass(frozen=True)
class ChunkWork:
    """One request's part of a pass, as every rank gets it."""

    request_id: str
    token_ids: list[int]  # the chunk's tokens
    start: int  # the chunk's first token in the prompt
    begin: CacheStart | None = None  # the request's first chunk: take its cached prefix, allocate its blocks
    last: bool = False  # completes the prompt: push the KV to ``targets`` (blocks held until ``Pass.finish``)
    targets: tuple[Target, ...] = ()


@dataclass(frozen=True)
class Pass:
    """One iteration of the group, the same message to every rank."""

    work: tuple[ChunkWork, ...]
    strategy: str  # the ring variant asked for ("auto" lets each rank's rule pick; they agree)
    evict: tuple[bytes, ...] = ()  # cached blocks to free first
    drop: tuple[str, ...] = ()  # started requests that were cancelled: free their blocks
    # Requests whose pushes are over on every rank: (request id, (prompt block, rank, hash) the
    # prefix cache keeps); the rest of their blocks are freed.
    finish: tuple[tuple[str, tuple[tuple[int, int, bytes], ...]], ...] = ()


@dataclass
class PassReport:
    """What one rank reports after a pass (and once at start-up: ready, or why not)."""

    rank: int
    forward_s: float = 0.0  # the model forward
    blocks_used: int = 0  # allocated KV blocks after the pass
    error: tuple[str, str] | None = None  # the pass itself failed here
