"""A KVP decode group: K processes, one per device; rank 0 (the gRPC process) leads.

Every rank owns a KV cache and a KV receiver that the prefill tier pushes to. The leader starts
ranks 1..K-1 as child processes and talks to them through queues: it sends reservations,
releases and decode steps; they send back what landed (each TCP frame stored, each NIXL
notification, as they come: the leader alone counts them), NIXL "done" notices, and failures. Queues, not
collectives, carry these messages so an idle group holds no collective that could time out;
only a step's attention partials travel over torch.distributed (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from ringserve.config import DecodeConfig
from ringserve.decode_service.kvp import KVPRank
from ringserve.engine.kv_cache import KVCache
from ringserve.engine.model import Llama
from ringserve.errors import RingserveError, Unavailable, error_from_code
from ringserve.kv_transfer.landing import Landed
from ringserve.kv_transfer.secret import deployment_secret
from ringserve.kv_transfer.tcp import Frame, KVReceiver
from ringserve.metrics import KV_BYTES
from ringserve.process_group import check_group, free_port, init_group, next_message

log = logging.getLogger(__name__)

# (rank, request_id, epoch, transfer_id, first row in the rank's share, rows, local KV heads or None: all)
OnLanded = Callable[[int, str, int, str, int, int, range | None], None]
OnDone = Callable[[str, int], None]  # (request_id, epoch): the prefill side writes nothing more
OnFailure = Callable[[str], None]  # (what happened)


def _device_for(cfg: DecodeConfig, rank: int) -> torch.device:
    dev = torch.device(cfg.device)
    return torch.device("cuda", rank) if dev.type == "cuda" and cfg.kvp > 1 else dev


def build_rank(cfg: DecodeConfig, rank: int, model: Llama | None, init_method: str | None) -> KVPRank:
    """Load the model (unless given), join the group, and allocate this rank's KV cache."""
    from ringserve.service import torch_dtype

    device = _device_for(cfg, rank)
    dtype = torch_dtype(cfg.dtype)
    if model is None:
        model = Llama.load(cfg.model, dtype=dtype, device=device, progress=rank == 0, load_format=cfg.load_format)
    if init_method is not None:
        init_group(rank, cfg.kvp, init_method, device, cfg.group_timeout_s)
        check_group(model, cfg.kvp, next(model.parameters()).dtype)
    cache = KVCache(model.config, cfg.kv_blocks, cfg.block_size, dtype=next(model.parameters()).dtype, device=device)
    return KVPRank(model, cache, rank, cfg.kvp)


def _receivers(cfg: DecodeConfig, rank: KVPRank, on_landed: OnLanded, on_done: OnDone):
    """A rank's ways in for prompt KV: a TCP receiver always (it stores admitted frames), a NIXL
    endpoint when the group's transport is NIXL (senders WRITE into the cache; the notification
    says which rows landed). Either way the rows are reported to the leader, which counts them.
    Returns (receiver, endpoint or None)."""

    def sink(frame: Frame, kv: torch.Tensor) -> None:
        local = rank.write_kv(frame, kv)
        KV_BYTES.labels("decode", "received").inc(frame.nbytes)
        on_landed(rank.rank, frame.request_id, frame.epoch, frame.transfer_id, local, frame.count, frame.heads)

    port = cfg.kv_port + rank.rank if cfg.kv_port else 0
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
                rank.rank, note.request_id, note.epoch, note.transfer_id, note.first_position, note.count, note.heads
            )

        try:
            endpoint = NixlEndpoint(
                rank.cache, on_landed=landed, on_done=lambda d: on_done(d.request_id, d.epoch), landing_key=key
            )
        except BaseException:
            receiver.close()
            raise
    return receiver, endpoint


def _rank_main(rank: int, cfg: DecodeConfig, init_method: str, inbox: mp.Queue, outbox: mp.Queue) -> None:
    from ringserve.logs import setup_logging

    setup_logging(f"decode-rank{rank}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the leader stops us
    torch.set_num_threads(max(1, torch.get_num_threads() // cfg.kvp))
    try:
        kvp = build_rank(cfg, rank, None, init_method)
        receiver, endpoint = _receivers(
            cfg, kvp, lambda *landed: outbox.put(("landed", *landed)), lambda *done: outbox.put(("done", *done))
        )
    except RingserveError as e:
        outbox.put(("failed", rank, e.code, str(e)))
        return
    outbox.put(("ready", rank, receiver.address, endpoint.template() if endpoint else None))
    parent = os.getppid()
    try:
        while (msg := next_message(inbox, parent)) is not None:
            kind, *args = msg
            if kind == "reserve":
                kvp.reserve(*args)
            elif kind == "free":
                kvp.free(*args)
            elif kind == "extend":
                kvp.extend(*args)
            elif kind == "step":
                kvp.step(args[0], group_wide=True)
    except RingserveError as e:
        outbox.put(("failed", rank, e.code, str(e)))
    except Exception as e:  # a bug: report it so the leader fails the group instead of hanging
        log.exception("decode rank %d failed", rank)
        outbox.put(("failed", rank, "INTERNAL", f"{type(e).__name__}: {e}"))
    finally:
        receiver.close()
        if endpoint is not None:
            endpoint.close()


class DecodeGroup:
    """The leader's handle on the group: rank 0's state, the other ranks' processes, messages."""

    def __init__(self, cfg: DecodeConfig, model: Llama | None = None):
        if cfg.kvp < 1:
            raise RingserveError(f"--kvp must be at least 1, got {cfg.kvp}")
        from ringserve.kv_transfer.nixl import select_transport

        # Decided once, by the leader, for every rank: the senders need one answer.
        cfg = dataclasses.replace(cfg, kv_transfer=select_transport(cfg.kv_transfer))
        self.cfg, self.world, self.transport = cfg, cfg.kvp, cfg.kv_transfer
        self._on_landed: OnLanded = lambda *landed: None
        self._on_done: OnDone = lambda *done: None
        self._on_failure: OnFailure = lambda what: None
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}" if cfg.kvp > 1 else None
        self._joined = init_method is not None
        self.outbox: mp.Queue = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(cfg.kvp - 1)]
        self.procs = [
            ctx.Process(
                target=_rank_main,
                args=(r, cfg, init_method, self.inboxes[r - 1], self.outbox),
                name=f"decode-rank{r}",
                daemon=True,
            )
            for r in range(1, cfg.kvp)
        ]
        torch.set_num_threads(max(1, torch.get_num_threads() // cfg.kvp))
        for p in self.procs:
            p.start()
        try:
            self.rank0 = build_rank(cfg, 0, model, init_method)
            self.receiver, self.endpoint = _receivers(
                cfg, self.rank0, lambda *landed: self._on_landed(*landed), lambda *done: self._on_done(*done)
            )
            others = self._wait_ready()
            self.addresses = [self.receiver.address] + [address for address, _ in others]
            # Per rank, what a NIXL landing needs besides the request (None: TCP only).
            self.templates = [self.endpoint.template() if self.endpoint else None] + [t for _, t in others]
        except BaseException:
            self.close()
            raise
        self._monitor: threading.Thread | None = None
        self._stopping = False

    @property
    def model(self) -> Llama:
        return self.rank0.model

    def _wait_ready(self) -> list[tuple[str, object]]:
        """Each other rank's (KV receiver address, NIXL landing template or None), in rank order."""
        ready: list = [None] * (self.world - 1)
        pending = set(range(1, self.world))
        while pending:
            try:
                kind, rank, *rest = self.outbox.get(timeout=0.5)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise Unavailable(f"decode group: {', '.join(dead)} died during start-up; see its log") from None
                continue
            if kind == "failed":
                raise error_from_code(rest[0], f"decode rank {rank}: {rest[1]}")
            ready[rank - 1] = (rest[0], rest[1])
            pending.discard(rank)
        return ready

    def start_monitor(self, on_landed: OnLanded, on_done: OnDone, on_failure: OnFailure) -> None:
        """Deliver every rank's landings and done notices, and report a rank that dies, to the worker."""
        self._on_landed, self._on_done, self._on_failure = on_landed, on_done, on_failure
        if self.procs:
            self._monitor = threading.Thread(target=self._watch, name="decode-group-monitor", daemon=True)
            self._monitor.start()

    def _watch(self) -> None:
        while not self._stopping:
            try:
                kind, *args = self.outbox.get(timeout=0.2)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead and not self._stopping:
                    self._on_failure(f"{dead[0].name} died (exit code {dead[0].exitcode})")
                    return
                continue
            if kind == "landed":
                self._on_landed(*args)
            elif kind == "done":
                self._on_done(*args)
            elif kind == "failed":
                self._on_failure(f"decode rank {args[0]} failed: {args[2]}")
                return

    def send(self, rank: int, msg: tuple) -> None:
        """Queue a message for rank >= 1 (rank 0's state is called directly)."""
        self.inboxes[rank - 1].put(msg)

    def close(self) -> None:
        self._stopping = True
        for q in self.inboxes:
            q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        if getattr(self, "receiver", None) is not None:
            self.receiver.close()
        if getattr(self, "endpoint", None) is not None:
            self.endpoint.close()
        if self._joined and dist.is_initialized():
            dist.destroy_process_group()
