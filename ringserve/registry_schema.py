"""The registry's data model in Redis: key names, a group's record and load, and their validated parsing.

Keys, one namespace per deployment (``ringserve:{cluster}``):

    {ns}:groups          SET of group ids: the index routers list; ids whose record is gone are pruned
    {ns}:group:{id}      HASH, the group's record: role, address, degree (CP or KVP ranks), tp (TP ranks
                         per CP/KVP rank; absent in older records: 1), block_size, ttl_ms and its load
                         (queued_tokens, active_requests, free_blocks, total_blocks, tokens_per_s); PEXPIRE ttl
    {ns}:blocks:{id}     SET of the block hashes (``engine.kv_cache.block_hashes``) the group holds; PEXPIRE ttl

Groups write them (``heartbeat.Registration``), routers read them (``registry.Registry``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import fields as fields_of

ROLES = ("prefill", "decode")


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
    degree: int  # CP (prefill) or KVP (decode) ranks
    block_size: int
    ttl_s: float
    load: Load
    tp: int = 1  # TP ranks per CP/KVP rank: the group's layout is tp x degree

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
            tp=_field(f, "tp", int, low=1) if "tp" in f else 1,
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
