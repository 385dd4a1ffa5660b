"""A KVP decode group: K processes (T x K under TP, ``mesh.Layout``), one per device; rank 0 (the gRPC process) leads.

Every rank owns a KV cache and a KV receiver that the prefill tier pushes to. The leader starts
ranks 1..K-1 (``process_group.LeaderLink``: local children, or processes on other hosts that join)
and sends them typed calls (``protocol``: reservations, frees, growth, steps); they send back
what landed, NIXL "done" notices, and failures. The rank link, not a collective, carries these so
an idle group holds no collective that could time out; only a step's attention partials travel
over torch.distributed (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import queue
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from ringserve.config import DecodeConfig
from ringserve.decode_service.kvp import KVPRank, StepEntry
from ringserve.decode_service.protocol import LeaderCall, PrefillDone, RankFailed, Ready, RowsLanded, Step
from ringserve.engine.kv_cache import KVCache
from ringserve.engine.model import Llama
from ringserve.errors import InvalidArgument, RingserveError, Unavailable, error_from_code
from ringserve.kv_transfer.landing import Landed
from ringserve.kv_transfer.secret import deployment_secret
from ringserve.kv_transfer.tcp import Frame, KVReceiver
from ringserve.mesh import Layout
from ringserve.metrics import KV_BYTES
from ringserve.process_group import check_group, init_group, join_and_load_tp
from ringserve.rank_link import LeaderLink, RankLink, RankLost, local_ranks

log = logging.getLogger(__name__)

OnLanded = Callable[[RowsLanded], None]
OnDone = Callable[[PrefillDone], None]
OnFailure = Callable[[str], None]  # (what happened)


def _device_for(cfg: DecodeConfig, rank: int) -> torch.device:
    dev = torch.device(cfg.device)
    return torch.device("cuda", rank) if dev.type == "cuda" and cfg.tp * cfg.kvp > 1 else dev


def build_rank(
    cfg: DecodeConfig, rank: int, model: Llama | None, init_method: str | None, device: torch.device | None = None
) -> KVPRank:
    """Load the model (unless given; under TP this rank's shard), join the group (world rank
    ``rank`` of TP x KVP, ``mesh.Layout``), and allocate this rank's KV cache (its heads; on
    ``device``, default: the rank's GPU, or the CPU)."""
    from ringserve.service import torch_dtype

    device = device or _device_for(cfg, rank)
    dtype = torch_dtype(cfg.dtype)
    if cfg.tp > 1:
        if model is not None:
            raise InvalidArgument("a TP decode group loads its own shards: give no model")
        model, mesh = join_and_load_tp(cfg, Layout(cfg.tp, cfg.kvp), rank, init_method, device, dtype)
        check_group(model, cfg.kvp, dtype, mesh.outer_group)
        cache = KVCache(model.config, cfg.kv_blocks, cfg.block_size, dtype=dtype, device=device)
        return KVPRank(model, cache, mesh.outer_rank, cfg.kvp, group=mesh.outer_group)
    if model is None:
        model = Llama.load(cfg.model, dtype=dtype, device=device, progress=rank == 0, load_format=cfg.load_format)
    if init_method is not None:
        init_group(rank, cfg.kvp, init_method, device, cfg.group_timeout_s)
        check_group(model, cfg.kvp, next(model.parameters()).dtype)
    cache = KVCache(model.config, cfg.kv_blocks, cfg.block_size, dtype=next(model.parameters()).dtype, device=device)
    return KVPRank(model, cache, rank, cfg.kvp)


def _receivers(cfg: DecodeConfig, rank: KVPRank, world_rank: int, on_landed: OnLanded, on_done: OnDone):
    """A rank's ways in for prompt KV: a TCP receiver always (it stores admitted frames), a NIXL
    endpoint when the group's transport is NIXL (senders WRITE into the cache; the notification
    says which rows landed). Either way the rows are reported to the leader, which counts them
    (by ``world_rank``: the TP ranks of one KVP rank each receive their heads).
    Returns (receiver, endpoint or None)."""

    def sink(frame: Frame, kv: torch.Tensor) -> None:
        local = rank.write_kv(frame, kv)
        KV_BYTES.labels("decode", "received").inc(frame.nbytes)
        on_landed(
            RowsLanded(world_rank, frame.request_id, frame.epoch, frame.transfer_id, local, frame.count, frame.heads)
        )

    port = cfg.kv_port + world_rank if cfg.kv_port else 0
    key = deployment_secret(cfg.deployment_secret_file)
    receiver = KVReceiver(
        rank.admit, sink, cfg.host, port, cfg.advertise_host, idle_timeout_s=cfg.kv_idle_timeout_s, frame_key=key
    )
    endpoint = None
    if cfg.kv_transfer == "nixl":
        from ringserve.kv_transfer.nixl import NixlEndpoint

        def landed(note: Landed) -> None:
            KV_BYTES.labels("decode", "received").inc(note.count * rank.cache.bytes_per_token)
            on_landed(
                RowsLanded(
                    world_rank,
                    note.request_id,
                    note.epoch,
                    note.transfer_id,
                    note.first_position,
                    note.count,
                    note.heads,
                )
            )

        try:
            endpoint = NixlEndpoint(
                rank.cache,
                on_landed=landed,
                on_done=lambda d: on_done(PrefillDone(d.request_id, d.epoch)),
                landing_key=key,
            )
        except BaseException:
            receiver.close()
            raise
    return receiver, endpoint


def rank_main(link: RankLink, device: torch.device | None = None) -> None:
    """A rank other than the leader: build, say ready, then carry out the leader's calls until it
    hangs up (or dies). ``device``: this host's (a rank started on its own)."""
    cfg: DecodeConfig = link.config
    try:
        kvp = build_rank(cfg, link.rank, None, link.welcome.init_method, device)
        receiver, endpoint = _receivers(cfg, kvp, link.rank, link.send, link.send)
    except RingserveError as e:
        link.send(RankFailed(link.rank, e.code, str(e)))
        return
    link.send(Ready(link.rank, receiver.address, endpoint.template() if endpoint else None))
    try:
        while (call := link.recv()) is not None:
            call.apply(kvp)
    except RingserveError as e:
        link.send(RankFailed(link.rank, e.code, str(e)))
    except Exception as e:  # a bug: report it so the leader fails the group instead of hanging
        log.exception("decode rank %d failed", link.rank)
        link.send(RankFailed(link.rank, "INTERNAL", f"{type(e).__name__}: {e}"))
    finally:
        receiver.close()
        if endpoint is not None:
            endpoint.close()


class DecodeGroup:
    """The leader's handle on the group: rank 0's state, the rank link to the others, their messages."""

    def __init__(self, cfg: DecodeConfig, model: Llama | None = None):
        if cfg.kvp < 1 or cfg.tp < 1:
            raise RingserveError(f"--kvp and --tp must be at least 1, got --kvp {cfg.kvp} --tp {cfg.tp}")
        from ringserve.kv_transfer.nixl import select_transport

        # Decided once, by the leader, for every rank: the senders need one answer.
        cfg = dataclasses.replace(cfg, kv_transfer=select_transport(cfg.kv_transfer))
        # ``world``: KVP ranks (what reservations place shares on); ``size``: processes (TP x KVP).
        self.cfg, self.world, self.transport = cfg, cfg.kvp, cfg.kv_transfer
        self.tp, self.size = cfg.tp, cfg.tp * cfg.kvp
        self._on_landed: OnLanded = lambda landed: None
        self._on_done: OnDone = lambda done: None
        self._on_failure: OnFailure = lambda what: None
        self._monitor: threading.Thread | None = None
        self.receiver = self.endpoint = None
        self.link = None
        try:
            if self.size > 1:
                secret = deployment_secret(cfg.deployment_secret_file)
                self.link = LeaderLink("decode", self.size, cfg.group_host, cfg.group_port, secret)
                self.link.spawn(local_ranks(cfg.local_ranks, self.size), rank_main)
                self.link.admit(cfg, cfg.group_timeout_s)
            self.rank0 = build_rank(cfg, 0, model, self.link.init_method if self.link else None)
            self.receiver, self.endpoint = _receivers(
                cfg, self.rank0, 0, lambda landed: self._on_landed(landed), lambda done: self._on_done(done)
            )
            others = self._wait_ready()
            self.addresses = [self.receiver.address] + [r.address for r in others]  # per world rank
            # Per world rank, what a NIXL landing needs besides the request (None: TCP only).
            self.templates = [self.endpoint.template() if self.endpoint else None] + [r.template for r in others]
        except BaseException:
            self.close()
            raise

    @property
    def model(self) -> Llama:
        return self.rank0.model

    @property
    def procs(self) -> list[mp.Process]:
        """The ranks this process started (ranks 1..), as processes."""
        return self.link.procs if self.link else []

    def _wait_ready(self) -> list[Ready]:
        """Each other rank's Ready, in world rank order."""
        ready: dict[int, Ready] = {}
        while len(ready) < self.size - 1:
            try:
                rank, msg = self.link.messages.get(timeout=self.cfg.group_timeout_s)
            except queue.Empty:
                missing = sorted(set(range(1, self.size)) - set(ready))
                raise Unavailable(
                    f"decode group: rank(s) {missing} did not get ready within {self.cfg.group_timeout_s:.0f} s"
                ) from None
            if isinstance(msg, RankLost):
                raise Unavailable(f"decode group: {msg.who} died during start-up; see its log")
            if isinstance(msg, RankFailed):
                raise error_from_code(msg.code, f"decode rank {rank}: {msg.message}")
            ready[rank] = msg
        return [ready[r] for r in range(1, self.size)]

    def start_monitor(self, on_landed: OnLanded, on_done: OnDone, on_failure: OnFailure) -> None:
        """Deliver every rank's landings and done notices, and report a rank that dies, to the worker."""
        self._on_landed, self._on_done, self._on_failure = on_landed, on_done, on_failure
        if self.link:
            self._monitor = threading.Thread(target=self._watch, name="decode-group-monitor", daemon=True)
            self._monitor.start()

    def _watch(self) -> None:
        while (item := self.link.messages.get()) is not None:
            rank, msg = item
            if isinstance(msg, RowsLanded):
                self._on_landed(msg)
            elif isinstance(msg, PrefillDone):
                self._on_done(msg)
            elif isinstance(msg, RankFailed):
                self._on_failure(f"decode rank {rank} failed: {msg.message}")
                return
            elif isinstance(msg, RankLost):
                self._on_failure(f"{msg.who} died")
                return

    def call(self, rank: int, call: LeaderCall) -> None:
        """Carry out a call on KVP rank ``rank``, on each of its TP ranks (they hold the same block
        tables): rank 0's state here, the others' over the link."""
        for world_rank in Layout(self.tp, self.world).tp_ranks(rank):
            if world_rank == 0:
                call.apply(self.rank0)
            else:
                self.link.send(world_rank, call)

    def send_step(self, entries: list[StepEntry], group_wide: bool) -> None:
        """Start a step on the ranks other than the leader: all of them, or (a step of KVP rank 0
        alone) its TP ranks, whose all-reduces the leader's step needs."""
        if group_wide:
            self.broadcast(Step(entries))
        else:
            for world_rank in range(1, self.tp):
                self.link.send(world_rank, Step(entries, group_wide=False))

    def broadcast(self, call: LeaderCall) -> None:
        """Send a call to every rank but the leader."""
        if self.link:
            self.link.broadcast(call)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link.messages.put(None)  # stops the monitor
        if self.receiver is not None:
            self.receiver.close()
        if self.endpoint is not None:
            self.endpoint.close()
        if self.link is not None and dist.is_initialized():
            dist.destroy_process_group()
