"""The routers' side of the registry: connecting to Redis, the groups with their load, and the
per-decision residency probe (the data model is ``registry_schema``; the groups' heartbeat is
``heartbeat``).

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
import socket
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ringserve.config import RedisArgs, read_secret
from ringserve.errors import InvalidArgument
from ringserve.registry_schema import GroupRecord, Keys, MalformedRecord

log = logging.getLogger(__name__)


def redacted(url: str) -> str:
    """``url`` fit for logs and messages: a password in it (redis://user:PASSWORD@host) shows as ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


PASSWORD_ENV = "RINGSERVE_REDIS_PASSWORD"


def connect(cfg: RedisArgs, timeout_s: float = 1.0) -> redis.Redis:
    """A client for ``cfg.redis_url`` that fails fast: no retries, short timeouts, so a Redis outage
    turns into a fallback at once rather than stalled requests. The password comes from
    ``--redis-password-file`` or RINGSERVE_REDIS_PASSWORD (else the URL's, if it has one); a
    ``rediss://`` URL is TLS with the server's certificate and name verified (against
    ``--redis-ca-cert``, else the system's CAs), presenting ``--redis-client-cert`` if given."""
    if not cfg.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise InvalidArgument(
            f"--redis-url must start with redis://, rediss:// or unix://, got {redacted(cfg.redis_url)!r}"
        )
    tls_files = {
        "ssl_ca_certs": cfg.redis_ca_cert,
        "ssl_certfile": cfg.redis_client_cert,
        "ssl_keyfile": cfg.redis_client_key,
    }
    options: dict = {k: v for k, v in tls_files.items() if v}
    if options and not cfg.redis_url.startswith("rediss://"):
        raise InvalidArgument(f"Redis TLS options need a rediss:// URL, got --redis-url {redacted(cfg.redis_url)}")
    if bool(cfg.redis_client_cert) != bool(cfg.redis_client_key):
        raise InvalidArgument("Redis client TLS needs both --redis-client-cert and --redis-client-key, or neither")
    if cfg.redis_url.startswith("rediss://"):
        options.update(ssl_cert_reqs="required", ssl_check_hostname=True)
    password = read_secret(cfg.redis_password_file, PASSWORD_ENV, "--redis-password-file")
    if password:
        options["password"] = password.decode()
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
