"""The worker registry and KV residency in Redis: the data model, the groups' side and the routers' reads.

Keys, one namespace per deployment (``ringserve:{cluster}``):

    {ns}:groups          SET of group ids: the index routers list; ids whose record is gone are pruned
    {ns}:group:{id}      HASH, the group's record: role, address, degree, block_size, ttl_ms and its load
                         (queued_tokens, active_requests, free_blocks, total_blocks, tokens_per_s); PEXPIRE ttl
    {ns}:blocks:{id}     SET of the block hashes (``engine.kv_cache.block_hashes``) the group holds; PEXPIRE ttl

A group's heartbeat rewrites its load, applies the residency changes since the last beat (SADD
stored, SREM evicted) and renews both TTLs, in one round trip. A group that stops beating (killed)
vanishes after its TTL, residency included; one that drains deletes its keys at once.

Routers re-read the groups and their load in the background (the load is as fresh as the last
heartbeat either way), and ask per decision, in one EVALSHA (``_PROBE``), for every prefill group's
longest cached prefix of the prompt's block chain. Each group's longest prefix is a binary search
over the chain: a chain is prefix-closed (a block's hash covers its whole prefix, and a prefix
cache holds a block only with its parents), so ~log2(n) SISMEMBERs per group instead of n (12 for
2048 blocks), and one for a group that does not hold the first block. Groups often hold the same
prefix (a system prompt every group has seen): the search first tries the answers of the groups
before it, so a repeated answer costs a few checks. (A 16-ary search, 15 blocks per SMISMEMBER,
makes fewer calls but checks more blocks: about 3x slower in one measurement.) Residency that
is not prefix-closed (a middle block evicted first) gives an answer between the first hole and the
last cached block: Redis is advisory, so such staleness costs a cache miss, never a wrong answer.

Single-instance Redis (or a primary with replicas); Redis Cluster is not supported (keys of many
groups meet in one script).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from dataclasses import fields as fields_of
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ringserve.config import RedisArgs, WorkerArgs
from ringserve.errors import InvalidArgument
from ringserve.metrics import REDIS_UP

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
_SYNC_CHUNK = 10_000  # members per SADD when republishing a whole residency set


def connect(cfg: RedisArgs, timeout_s: float = 1.0) -> redis.Redis:
    """A client for ``cfg.redis_url`` (password, TLS options) that fails fast: no retries, short
    timeouts, so a Redis outage turns into a fallback at once rather than stalled requests."""
    if not cfg.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise InvalidArgument(f"--redis-url must start with redis://, rediss:// or unix://, got {cfg.redis_url!r}")
    tls_files = {
        "ssl_ca_certs": cfg.redis_ca_cert,
        "ssl_certfile": cfg.redis_client_cert,
        "ssl_keyfile": cfg.redis_client_key,
    }
    options: dict = {k: v for k, v in tls_files.items() if v}
    if options and not cfg.redis_url.startswith("rediss://"):
        raise InvalidArgument(f"Redis TLS options need a rediss:// URL, got --redis-url {cfg.redis_url}")
    if cfg.redis_password:
        options["password"] = cfg.redis_password  # else the URL's, if it has one
    return redis.Redis.from_url(
        cfg.redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        **options,
    )


def advertised_address(host: str, advertise_host: str | None, port: int) -> str:
    """host:port that routers can reach: --advertise-host, else --host unless it is a wildcard
    (0.0.0.0 or ::), else this machine's name."""
    name = advertise_host or (socket.getfqdn() if host in ("0.0.0.0", "::", "") else host)
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


class Keys:
    """Key names of one deployment (see the module docstring)."""

    def __init__(self, cluster: str):
        self.ns = f"ringserve:{cluster}"
        self.groups = f"{self.ns}:groups"

    def record(self, group_id: str) -> str:
        return f"{self.ns}:group:{group_id}"

    def blocks(self, group_id: str) -> str:
        return f"{self.ns}:blocks:{group_id}"


@dataclass
class Load:
    """What a group reports at each heartbeat: the work it holds and its room for more."""

    queued_tokens: int = 0  # prompt tokens admitted and not yet prefilled
    active_requests: int = 0  # requests admitted and not finished (decode: reserved or decoding)
    free_blocks: int = 0
    total_blocks: int = 0
    tokens_per_s: float = 0.0  # measured prefill speed; 0 until measured


@dataclass
class GroupRecord:
    """A group as the registry lists it."""

    id: str
    role: str
    address: str
    degree: int
    block_size: int
    ttl_s: float
    load: Load

    @classmethod
    def parse(cls, group_id: str, fields: dict[bytes, bytes]) -> GroupRecord:
        """The record from its Redis hash; ``MalformedRecord`` naming the first bad field."""
        try:
            f = {k.decode(): v.decode() for k, v in fields.items()}
        except UnicodeDecodeError as e:
            raise MalformedRecord(f"a field is not UTF-8 ({e})") from None
        role = _field(f, "role", str)
        if role not in ROLES:
            raise MalformedRecord(f"role is {role!r}, not one of {ROLES}")
        address = _field(f, "address", str)
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise MalformedRecord(f"address {address!r} is not host:port")
        return cls(
            id=group_id,
            role=role,
            address=address,
            degree=_field(f, "degree", int, low=1),
            block_size=_field(f, "block_size", int, low=1),
            ttl_s=_field(f, "ttl_ms", int, low=1) / 1000,
            load=Load(**{name: _field(f, name, kind, low=0) for name, kind in _LOAD_FIELDS}),
        )


class MalformedRecord(ValueError):
    """A group record in Redis that does not follow the schema (written by something else, or by an
    incompatible version): routers skip it."""


_LOAD_FIELDS = [(f.name, int if f.type in (int, "int") else float) for f in fields_of(Load)]


def _field(f: dict[str, str], name: str, kind: type, low: float | None = None):
    """Field ``name`` of a record as ``kind`` (str, int or float), at least ``low`` when given."""
    if name not in f:
        raise MalformedRecord(f"field {name} is missing")
    if kind is str:
        return f[name]
    try:
        value = kind(f[name])
    except ValueError:
        raise MalformedRecord(f"field {name} is {f[name]!r}, not an {kind.__name__}") from None
    if not math.isfinite(value) or (low is not None and value < low):
        raise MalformedRecord(f"field {name} is {value}, out of range")
    return value


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
        self.load, self.changes = load, changes
        self.heartbeat_s, self.ttl_ms = cfg.heartbeat_s, int(cfg.registry_ttl_s * 1000)
        self.redis_url = cfg.redis_url
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


# Every prefill group's longest cached prefix of a prompt, in one round trip (see the script's comments).
_PROBE = (Path(__file__).parent / "registry_probe.lua").read_text()


class Registry:
    """The routers' reads: the groups with their load, and the per-decision probe."""

    def __init__(self, client: redis.Redis, cluster: str):
        self.client = client
        self.keys = Keys(cluster)
        self._probe = client.register_script(_PROBE)
        self._malformed: dict[str, str] = {}  # group id -> what was wrong with it when last logged

    def _warn_malformed(self, group_id: str, error: MalformedRecord) -> None:
        """Log a skipped record once, not at every refresh (again only if what is wrong changes)."""
        if self._malformed.get(group_id) != str(error):
            self._malformed[group_id] = str(error)
            log.warning("registry: skipping group record %s: %s", group_id, error)

    def groups(self) -> list[GroupRecord]:
        """Every registered group and its last reported load (two round trips); index entries of
        expired groups are pruned."""
        ids = sorted(m.decode() for m in self.client.smembers(self.keys.groups))
        pipe = self.client.pipeline(transaction=False)
        for group_id in ids:
            pipe.hgetall(self.keys.record(group_id))
        found, gone = [], []
        for group_id, fields in zip(ids, pipe.execute()):
            if not fields:
                gone.append(group_id)
                continue
            try:
                found.append(GroupRecord.parse(group_id, fields))
            except MalformedRecord as e:
                self._warn_malformed(group_id, e)
        self._malformed = {g: self._malformed[g] for g in ids if g in self._malformed}
        if gone:
            self.client.srem(self.keys.groups, *gone)
        return found

    def probe(self, groups: list[tuple[str, int]], chains: list[list[bytes]]) -> list[int]:
        """The longest prefix, in blocks, of a chain that each group holds: ``groups`` holds (group
        id, index into ``chains``) pairs, one chain per block size in use."""
        if not groups:
            return []
        width = next((len(chain[0]) for chain in chains if chain), 1)  # 1: no chain holds a block
        keys = [self.keys.blocks(g) for g, _ in groups]
        argv = [width, " ".join(str(c) for _, c in groups), *(b"".join(chain) for chain in chains)]
        return [int(n) for n in self._probe(keys=keys, args=argv).split()]
