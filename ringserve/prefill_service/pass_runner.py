"""The prefill leader's handle on its group's ranks: start them (``process_group.LeaderLink``:
local children or processes on other hosts), send each pass to every rank, run rank 0's part here
and collect every rank's report. Passes travel over the rank link, not a collective, so an idle
group holds no collective that could time out."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from ringserve.config import PrefillConfig
from ringserve.errors import RingserveError, Unavailable, error_from_code
from ringserve.kv_transfer.secret import deployment_secret
from ringserve.prefill_service.prefix_cache import RankSeq
from ringserve.prefill_service.protocol import Pass, PassReport
from ringserve.prefill_service.push import Pusher, PushResult
from ringserve.prefill_service.rank import build_runner, rank_main, run_pass
from ringserve.rank_link import LeaderLink, RankLost, local_ranks

log = logging.getLogger(__name__)


class PassRunner:
    """Runs passes on every rank of the group; ``on_push`` gets every rank's push results as they
    come (rank 0's from its own push stage, the others' over the link)."""

    def __init__(self, cfg: PrefillConfig, on_push: Callable[[PushResult], None]):
        self.cfg, self.world = cfg, cfg.tp * cfg.cp  # every world rank of the TP x CP layout
        secret = deployment_secret(cfg.deployment_secret_file)
        self.link = LeaderLink("prefill", self.world, cfg.group_host, cfg.group_port, secret)
        self._reports: queue.Queue[PassReport] = queue.Queue()
        self._lost: dict[int, str] = {}  # rank -> who, for ranks whose link closed
        self._on_push = on_push
        self.active: dict[str, RankSeq] = {}  # rank 0's sequences
        self.endpoint = None
        try:
            self.link.spawn(local_ranks(cfg.local_ranks, self.world), rank_main)
            self.link.admit(cfg, cfg.group_timeout_s)
            self._reader = threading.Thread(target=self._read, name="prefill-reports", daemon=True)
            self._reader.start()
            self.runner, self.blocks, self.endpoint, source = build_runner(cfg, 0, self.link.init_method)
            self.pusher = Pusher(self.runner, self.endpoint, on_push, cfg.kv_push_timeout_s, secret, source)
            for report in self.collect():
                if report.error:
                    raise error_from_code(*report.error)
        except BaseException:
            self.link.close()
            if self.endpoint is not None:
                self.endpoint.close()
            raise

    def run(self, p: Pass) -> tuple[list[torch.Tensor] | None, list[PassReport]]:
        """Send a pass to every rank, run rank 0's part, collect every report (rank order); any
        rank's error, or a lost rank, is raised (the group is broken then)."""
        self.link.broadcast(p)
        try:
            logits, mine = run_pass(self.runner, self.blocks, self.active, p, self.pusher)
        except Exception as e:  # the other ranks are stuck in (or past) this pass's ring
            if isinstance(e, RingserveError):
                raise
            raise Unavailable(f"prefill group: the leader failed a pass ({type(e).__name__}: {e})") from e
        reports = [mine, *self.collect()]
        for r in reports:
            if r.error:
                raise error_from_code(*r.error)
        return logits, reports

    def collect(self) -> list[PassReport]:
        """One report from every other rank; a rank that died or hangs past the timeout raises."""
        got: list[PassReport] = []
        deadline = time.monotonic() + self.cfg.group_timeout_s
        while len(got) < self.world - 1:
            try:
                got.append(self._reports.get(timeout=0.2))
            except queue.Empty:
                dead = self.lost()
                if dead or time.monotonic() > deadline:
                    raise Unavailable(
                        f"prefill group: {', '.join(dead) or 'a rank'} "
                        f"{'died' if dead else 'did not answer in time'}; restart the prefill group"
                    ) from None
        return sorted(got, key=lambda r: r.rank)

    def lost(self) -> list[str]:
        """The ranks gone (their link closed), e.g. "prefill-rank1 (exit code -9)"."""
        return list(self._lost.values())

    def _read(self) -> None:
        """Route the other ranks' messages: pass reports to ``collect``, push results as they come."""
        while (item := self.link.messages.get()) is not None:
            rank, msg = item
            if isinstance(msg, RankLost):
                self._lost[rank] = msg.who
            elif isinstance(msg, PushResult):  # a push stage names its CP rank; the leader counts world ranks
                self._on_push(dataclasses.replace(msg, rank=rank))
            else:
                self._reports.put(msg)

    def free_all(self) -> None:
        """Free every block rank 0 holds for requests (the group broke)."""
        for rs in self.active.values():
            self.blocks.finish(rs, ())
        self.active.clear()

    def close(self) -> None:
        """Hang up on the ranks (they exit), stop the reader, the push stage and the endpoint."""
        self.link.close()
        self.link.messages.put(None)
        self._reader.join(timeout=5)
        self.pusher.close()
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
