"""The worker registry and residency in a real Redis: registration, heartbeat, TTL expiry,
deregistration, residency batches and resync, and the longest-prefix probe against brute force."""

import logging
import random
import time
import uuid

import pytest

from ringserve.config import RedisArgs, WorkerArgs
from ringserve.engine.kv_cache import block_hashes
from ringserve.errors import InvalidArgument
from ringserve.heartbeat import Registration
from ringserve.registry import Registry, connect
from ringserve.registry_schema import Keys, Load


def eventually(check, timeout_s: float = 3.0):
    """Poll ``check`` until it returns a truthy value; fail with its last value after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"not true within {timeout_s} s"
            return value
        time.sleep(0.02)


@pytest.fixture
def cfg(redis_server):
    """Worker settings on the session's Redis, in a fresh namespace, with short heartbeats and TTL."""
    return WorkerArgs(
        redis_url=redis_server.url, cluster=f"test-{uuid.uuid4().hex[:8]}", heartbeat_s=0.05, registry_ttl_s=0.5
    )


class Batches:
    """A residency source like the prefill cache's ``cache_changes``: hands out queued batches once."""

    def __init__(self):
        self.queue: list[tuple[list[bytes], list[bytes]]] = []

    def __call__(self) -> tuple[list[bytes], list[bytes]]:
        return self.queue.pop(0) if self.queue else ([], [])


def test_register_heartbeat_expire_and_deregister(cfg):
    registry = Registry(connect(cfg), cfg.cluster)
    load = Load(queued_tokens=5, active_requests=1, free_blocks=100, total_blocks=128, tokens_per_s=250.0)
    prefill = Registration(cfg, "prefill", degree=2, block_size=64, load=lambda: load).start("10.0.0.1:50051")
    decode = Registration(cfg, "decode", degree=1, block_size=16, load=Load).start("10.0.0.2:50061")
    try:
        records = {r.role: r for r in registry.groups()}
        p = records["prefill"]
        assert (p.id, p.address, p.degree, p.block_size, p.ttl_s) == (prefill.id, "10.0.0.1:50051", 2, 64, 0.5)
        assert p.load == load and records["decode"].address == "10.0.0.2:50061"
        assert 0 < registry.client.pttl(Keys(cfg.cluster).record(prefill.id)) <= 500

        load.queued_tokens = 777  # the next heartbeat carries it
        eventually(lambda: [r.load.queued_tokens for r in registry.groups() if r.role == "prefill"] == [777])

        decode.deregister()  # draining: gone at once, not after the TTL
        assert [r.role for r in registry.groups()] == ["prefill"]

        prefill.stop()  # killed: no more heartbeats, so the entry outlives it by its TTL at most
        t0 = time.monotonic()
        eventually(lambda: not registry.groups(), timeout_s=2.0)
        assert time.monotonic() - t0 <= 0.5 + 0.2
        assert not registry.client.smembers(Keys(cfg.cluster).groups), "expired ids are pruned from the index"
    finally:
        prefill.stop()


def test_heartbeat_must_beat_within_the_ttl(cfg):
    cfg.heartbeat_s = cfg.registry_ttl_s
    with pytest.raises(InvalidArgument, match="below --registry-ttl-s"):
        Registration(cfg, "prefill", 1, 64, Load)


def test_residency_is_published_in_batches_expires_and_resyncs(cfg):
    client = connect(cfg)
    batches = Batches()
    a, b, c, d = (bytes([i]) * 16 for i in range(4))
    batches.queue.append(([a, b, c], []))
    reg = Registration(cfg, "prefill", 1, 64, Load, changes=batches).start("127.0.0.1:1")
    blocks = Keys(cfg.cluster).blocks(reg.id)
    try:
        assert client.smembers(blocks) == {a, b, c}, "the first beat publishes at once"
        batches.queue.append(([d], [b]))
        eventually(lambda: client.smembers(blocks) == {a, c, d})
        batches.queue.append(([b], [b]))  # stored and evicted between two beats: evicted
        eventually(lambda: not batches.queue)
        time.sleep(0.15)
        assert client.smembers(blocks) == {a, c, d}
        assert 0 < client.pttl(blocks) <= 500, "residency expires with the group"

        client.flushall()  # what a Redis restart without persistence leaves
        eventually(lambda: client.smembers(blocks) == {a, c, d}, timeout_s=2.0)
    finally:
        reg.stop()
    eventually(lambda: not client.exists(blocks), timeout_s=2.0)


def _prefix_closed_residency(rng, docs, groups, block_size):
    """Per group: the blocks of random prefixes of random documents (a prefix cache's shape)."""
    held = {}
    for g in groups:
        blocks = set()
        for doc in rng.sample(docs, k=rng.randint(0, len(docs))):
            chain = block_hashes(doc, block_size)
            blocks.update(chain[: rng.randint(0, len(chain))])
        held[g] = blocks
    return held


def _longest_by_brute_force(chain, blocks):
    n = 0
    while n < len(chain) and chain[n] in blocks:
        n += 1
    return n


def test_longest_prefix_probe_matches_brute_force(cfg):
    rng = random.Random(7)
    block_size = 4
    base = [rng.randrange(1000) for _ in range(60)]
    # Documents that share prefixes of various lengths with each other.
    docs = [base[: rng.randint(0, 60)] + [rng.randrange(1000) for _ in range(rng.randint(4, 60))] for _ in range(8)]
    names = [f"g{i}" for i in range(6)]
    held = _prefix_closed_residency(rng, docs, names, block_size)
    regs = {}
    for g in names:
        batches = Batches()
        batches.queue.append((sorted(held[g]), []))
        regs[g] = Registration(cfg, "prefill", 1, block_size, Load, changes=batches).start(f"{g}:1")
    registry = Registry(connect(cfg), cfg.cluster)
    try:
        tail = [rng.randrange(1000) for _ in range(9)]
        prompts = [doc[: rng.randint(0, len(doc))] + tail[: rng.randint(0, 9)] for doc in docs * 5]
        prompts += [[], base, docs[0]]
        for ids in prompts:
            chain = block_hashes(ids, block_size)
            hits = registry.probe([(regs[g].id, 0) for g in names], [chain])
            assert hits == [_longest_by_brute_force(chain, held[g]) for g in names]

        # Two block sizes in one round trip: each group is probed with the chain of its own size.
        chains = [block_hashes(docs[1], 8), block_hashes(docs[1], 4)]
        hits = registry.probe([(regs["g0"].id, 0), (regs["g1"].id, 1)], chains)
        assert hits == [0, _longest_by_brute_force(chains[1], held["g1"])], "g0 holds blocks of size 4 only"
        assert hits[1] > 0

        regs["g2"].deregister()  # a group gone from the registry holds nothing
        assert registry.probe([(regs["g2"].id, 0)], [block_hashes(docs[2], block_size)]) == [0]
    finally:
        for reg in regs.values():
            reg.stop()


def test_password_protected_redis(tmp_path, monkeypatch):
    """The password from --redis-password-file, else RINGSERVE_REDIS_PASSWORD; a wrong one is refused."""
    import redis

    from ringserve.redis_server import EmbeddedRedis

    server = EmbeddedRedis(password="s3cret").start()
    (tmp_path / "right").write_text("s3cret\n")
    (tmp_path / "wrong").write_text("wrong")
    try:
        cfg = WorkerArgs(redis_url=server.url, redis_password_file=str(tmp_path / "right"), heartbeat_s=0.05)
        reg = Registration(cfg, "decode", 1, 16, Load).start("127.0.0.1:1")
        try:
            assert [r.id for r in Registry(connect(cfg), cfg.cluster).groups()] == [reg.id]
            monkeypatch.setenv("RINGSERVE_REDIS_PASSWORD", "s3cret")
            assert connect(RedisArgs(redis_url=server.url)).ping()
            with pytest.raises(redis.AuthenticationError):  # the file wins over the variable
                connect(RedisArgs(redis_url=server.url, redis_password_file=str(tmp_path / "wrong"))).ping()
            monkeypatch.delenv("RINGSERVE_REDIS_PASSWORD")
            with pytest.raises(redis.AuthenticationError):
                connect(RedisArgs(redis_url=server.url)).ping()
        finally:
            reg.stop()
    finally:
        server.stop()


def test_redis_over_tls(tls_redis_binary, tmp_path):
    """A real redis-server serving TLS only, with client certificates required and a password: the
    registry works over it with the CA, a client certificate and the password; refused without the CA (the
    system's CAs do not know it), without a client certificate, with one of another CA, over plaintext,
    and when the server's certificate does not name the address dialled."""
    import redis

    from ringserve.redis_server import EmbeddedRedis
    from ringserve.tls import ChannelTls
    from tests.certs import CA

    ca, other = CA(tmp_path / "ca"), CA(tmp_path / "other", "another-ca")
    issued = ca.issue("redis")
    client, stranger = ca.issue("client", role="decode"), other.issue("stranger", role="decode")
    (tmp_path / "password").write_text("tls-s3cret")
    tls = ChannelTls(issued.ca, issued.cert, issued.key)
    server = EmbeddedRedis(password="tls-s3cret", tls=tls, binary=tls_redis_binary).start()
    assert server.url.startswith("rediss://")

    def args(**kw) -> WorkerArgs:
        given = {"redis_ca_cert": ca.path, "redis_client_cert": client.cert, "redis_client_key": client.key}
        base = {"redis_url": server.url, "redis_password_file": str(tmp_path / "password"), **given}
        return WorkerArgs(**{**base, **kw}, cluster=f"tls-{uuid.uuid4().hex[:8]}", heartbeat_s=0.05)

    try:
        cfg = args()
        reg = Registration(cfg, "prefill", 1, 16, Load).start("127.0.0.1:1")
        try:
            assert [r.id for r in Registry(connect(cfg), cfg.cluster).groups()] == [reg.id]
        finally:
            reg.deregister()
        refused = {  # what the client lacks -> what fails (the server's alert may come after our first write)
            "CERTIFICATE_VERIFY_FAILED": args(redis_ca_cert=None),  # the CA: the system's do not know it
            "CERTIFICATE_REQUIRED|EOF|reset": args(redis_client_cert=None, redis_client_key=None),
            "UNKNOWN_CA|EOF|reset": args(redis_client_cert=stranger.cert, redis_client_key=stranger.key),  # other CA
            "reset|closed": args(redis_url=server.url.replace("rediss://", "redis://"), redis_ca_cert=None,
                                 redis_client_cert=None, redis_client_key=None),  # plaintext
        }  # fmt: skip
        for error, bad in refused.items():
            with pytest.raises(redis.ConnectionError, match=error):
                connect(bad).ping()
    finally:
        server.stop()
    misnamed = ca.issue("redis-elsewhere", hosts=("redis.elsewhere.svc",))
    tls = ChannelTls(misnamed.ca, misnamed.cert, misnamed.key)
    server = EmbeddedRedis(password="tls-s3cret", tls=tls, binary=tls_redis_binary).start()
    try:
        with pytest.raises(redis.ConnectionError, match="mismatch"):
            connect(args(redis_url=server.url)).ping()
    finally:
        server.stop()


def test_tls_options_need_a_rediss_url():
    with pytest.raises(InvalidArgument, match="rediss://"):
        connect(WorkerArgs(redis_url="redis://127.0.0.1:6379/0", redis_ca_cert="/etc/ca.pem"))
    with pytest.raises(InvalidArgument, match="must start with redis://"):
        connect(WorkerArgs(redis_url="127.0.0.1:6379"))
    with pytest.raises(InvalidArgument, match="both --redis-client-cert and --redis-client-key"):
        connect(WorkerArgs(redis_url="rediss://127.0.0.1:6379/0", redis_client_cert="/etc/c.pem"))


def test_malformed_records_are_skipped_and_logged_once(cfg, caplog):
    """A bad record (missing or mistyped field, unknown role, bad address, undecodable bytes) is
    skipped with one warning; the good records are still listed, refresh after refresh."""
    good = Registration(cfg, "prefill", 1, 64, Load).start("10.0.0.1:50051")
    keys, client = Keys(cfg.cluster), connect(cfg)
    fields = {k.decode(): v for k, v in client.hgetall(keys.record(good.id)).items()}
    bad = {
        "missing-field": {k: v for k, v in fields.items() if k != "block_size"},
        "not-a-number": {**fields, "degree": b"two"},
        "unknown-role": {**fields, "role": b"oracle"},
        "no-port": {**fields, "address": b"10.0.0.9"},
        "zero-block-size": {**fields, "block_size": b"0"},
        "negative-load": {**fields, "free_blocks": b"-5"},
        "not-utf8": {**fields, "address": b"\xff\xfe:1"},
    }
    try:
        for name, record in bad.items():
            client.hset(keys.record(name), mapping=record)
            client.sadd(keys.groups, name)
        registry = Registry(client, cfg.cluster)
        with caplog.at_level(logging.WARNING, logger="ringserve.registry"):
            for _ in range(3):
                assert [r.id for r in registry.groups()] == [good.id]
        warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
        assert len(warned) == len(bad), warned  # once per record, not once per refresh
        for name in bad:
            assert any(name in m for m in warned), name
        assert any("block_size" in m for m in warned if "missing-field" in m)
    finally:
        good.stop()


def test_a_redis_password_never_reaches_logs_or_messages():
    from ringserve.registry import redacted

    assert redacted("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redacted("rediss://ringserve:s3cret@redis.ns.svc:6380") == "rediss://ringserve:***@redis.ns.svc:6380"
    assert redacted("redis://10.0.0.5:6379/0") == "redis://10.0.0.5:6379/0"
    with pytest.raises(InvalidArgument) as e:
        connect(RedisArgs(redis_url="http://:s3cret@10.0.0.5:6379"))
    assert "s3cret" not in str(e.value) and "***" in str(e.value)
