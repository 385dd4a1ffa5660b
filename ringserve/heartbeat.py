"""A group's side of the registry: its heartbeat (``Registration``: record, load, residency, TTLs)
and the work it counts for its load (``WorkCounter``).

A group's heartbeat rewrites its load, applies the residency changes since the last beat (SADD
stored, SREM evicted) and renews both TTLs, in one round trip. A group that stops beating (killed)
vanishes after its TTL, residency included; one that drains deletes its keys at once.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict

import redis

from ringserve.config import WorkerArgs
from ringserve.errors import InvalidArgument
from ringserve.metrics import REDIS_UP
from ringserve.registry import connect, redacted
from ringserve.registry_schema import ROLES, Keys, Load

log = logging.getLogger(__name__)

_SYNC_CHUNK = 10_000  # members per SADD when republishing a whole residency set


class WorkCounter:
    """A group's admitted work (requests, prompt tokens) and measured prefill speed, for its Load."""

    def __init__(self, smoothing: float = 0.3):
        self.lock = threading.Lock()
        self.requests = 0
        self.tokens = 0
        self.tokens_per_s = 0.0
        self.smoothing = smoothing

    @contextmanager
    def admitted(self, tokens: int):
        """Count a request and its prompt tokens while the block runs."""
        with self.lock:
            self.requests += 1
            self.tokens += tokens
        try:
            yield
        finally:
            with self.lock:
                self.requests -= 1
                self.tokens -= tokens

    def observe(self, tokens: int, seconds: float) -> None:
        """One finished prefill: fold its speed into the moving average."""
        if seconds <= 0:
            return
        with self.lock:
            speed = tokens / seconds
            a = self.smoothing
            self.tokens_per_s = speed if self.tokens_per_s == 0 else (1 - a) * self.tokens_per_s + a * speed


Changes = Callable[[], tuple[list[bytes], list[bytes]]]


class Registration:
    """One group's entry in the registry, kept alive by a heartbeat thread.

    ``load()`` is called at every beat. ``changes()`` (prefill groups with a prefix cache) returns
    the block hashes stored and evicted since its last call; they are published in the same beat.
    The registration keeps its own copy of the resident set, so whenever Redis may have lost
    entries (unreachable for a while, restarted empty, the record expired) it republishes all of it.
    """

    def __init__(
        self,
        cfg: WorkerArgs,
        role: str,
        degree: int,
        block_size: int,
        load: Callable[[], Load],
        changes: Changes | None = None,
    ):
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {ROLES}, got {role!r}")
        if not 0 < cfg.heartbeat_s < cfg.registry_ttl_s:
            raise InvalidArgument(
                f"--heartbeat-s ({cfg.heartbeat_s}) must be positive and below --registry-ttl-s "
                f"({cfg.registry_ttl_s}), or a live group would expire between beats"
            )
        self.role, self.degree, self.block_size = role, degree, block_size
        self.tp = cfg.tp  # the layout: tp x degree ranks
        self.load, self.changes = load, changes
        self.heartbeat_s, self.ttl_ms = cfg.heartbeat_s, int(cfg.registry_ttl_s * 1000)
        self.redis_url = redacted(cfg.redis_url)  # for logs only
        self.client = connect(cfg)
        self.keys = Keys(cfg.cluster)
        self.id = ""
        self.address = ""
        self.resident: set[bytes] = set()
        self._resync = True  # Redis may not hold our residency: republish it whole at the next beat
        self._redis_ok: bool | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_registered: list[Callable[[], None]] = []

    def when_registered(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once Redis has accepted a heartbeat (now, if one has been accepted)."""
        self._on_registered.append(callback)
        if self._redis_ok:
            callback()

    def start(self, address: str) -> Registration:
        """Register as serving at ``address`` (first beat now, then every heartbeat_s)."""
        self.address = address
        self.id = f"{self.role}-{address}-{uuid.uuid4().hex[:8]}"  # a restarted group is a new group
        self.beat()
        self._thread = threading.Thread(target=self._run, name="registry-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except Exception:  # a bug in load() or changes(): keep beating, or the group silently expires
                log.exception("heartbeat of %s failed", self.id)

    def beat(self) -> None:
        """One heartbeat: load, residency changes, TTLs. Redis errors are logged, never raised."""
        stored, evicted = self.changes() if self.changes else ([], [])
        self.resident.update(stored)
        self.resident.difference_update(evicted)  # a hash in both lists counts as evicted
        record, blocks = self.keys.record(self.id), self.keys.blocks(self.id)
        fields = {
            "role": self.role,
            "address": self.address,
            "degree": self.degree,
            "tp": self.tp,
            "block_size": self.block_size,
            "ttl_ms": self.ttl_ms,
            **asdict(self.load()),
        }
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.exists(record)
            pipe.hset(record, mapping=fields)
            pipe.pexpire(record, self.ttl_ms)
            pipe.sadd(self.keys.groups, self.id)
            if not self._resync:
                if stored:
                    pipe.sadd(blocks, *stored)
                if evicted:
                    pipe.srem(blocks, *evicted)
                pipe.pexpire(blocks, self.ttl_ms)
            existed = pipe.execute()[0]
            if not existed:
                self._resync = True  # first beat, or Redis forgot us (restart, expiry)
            if self._resync:
                self._publish_all()
                self._resync = False
            self._set_redis_ok(True)
        except redis.RedisError as e:
            self._resync = True
            self._set_redis_ok(False, e)

    def _publish_all(self) -> None:
        blocks = self.keys.blocks(self.id)
        members = list(self.resident)
        pipe = self.client.pipeline(transaction=True)  # routers never see a half-written set
        pipe.delete(blocks)
        for i in range(0, len(members), _SYNC_CHUNK):
            pipe.sadd(blocks, *members[i : i + _SYNC_CHUNK])
        pipe.pexpire(blocks, self.ttl_ms)
        pipe.execute()

    def _set_redis_ok(self, ok: bool, error: Exception | None = None) -> None:
        if ok != self._redis_ok:
            if ok:
                log.info("registered %s in Redis at %s (heartbeat %.1f s)", self.id, self.redis_url, self.heartbeat_s)
                for callback in self._on_registered:
                    callback()
            else:
                log.warning(
                    "Redis at %s unreachable (%s): serving on unregistered; routers that knew this group keep "
                    "using it, and it re-registers when Redis returns",
                    self.redis_url,
                    error,
                )
            REDIS_UP.labels(self.role).set(int(ok))
        self._redis_ok = ok

    def stop(self) -> None:
        """Stop heartbeating (the entry then expires after its TTL)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def deregister(self) -> None:
        """Stop heartbeating and delete the entry now, so routers stop picking this group."""
        self.stop()
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.keys.record(self.id), self.keys.blocks(self.id))
            pipe.srem(self.keys.groups, self.id)
            pipe.execute()
            log.info("deregistered %s", self.id)
        except redis.RedisError as e:
            log.warning("could not deregister %s (%s): it drops out after its TTL", self.id, e)
