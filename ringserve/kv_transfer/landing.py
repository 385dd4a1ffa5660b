"""What the NIXL path puts on the wire: the landing a decode rank hands out, and the notifications.

A landing (``Landing.to_bytes``) travels in a Reserve answer: magic, version and seal kind, a JSON
header (agent, incarnation, the pool's byte layout, request, epoch, the prefill group it is for,
expiry, rows), the agent's NIXL
metadata, the reservation's block ids and a seal over all of it: an HMAC-SHA256 keyed by the
deployment secret (``kv_transfer/secret.py``) when the deployment has one, else an xxh3-64
checksum. Notifications travel with a WRITE (``landed_notif``: request, epoch, transfer, rows) or
alone after a request's last push (``done_notif``: the sender writes nothing more for that
request and epoch); a piece strided in the receiver's pool goes as a ``Pull``: the receiver
grants room in its staging buffer (``Reply``), the sender WRITEs the packed rows there
(``Staged``) and the receiver stores them and answers again (``Reply``, "stored").
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from ringserve.engine.kv_cache import KVCache
from ringserve.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from ringserve.kv_transfer.secret import TAG_BYTES, tag, verify

LANDING_VERSION = 4
_MAGIC = b"RSKV"
_HEAD = struct.Struct("<4sHBII")  # magic, version, seal kind, header JSON bytes, metadata bytes
_CHECKSUM, _MAC = 0, 1  # seal kinds: xxh3-64 (8 bytes) or HMAC-SHA256 (32) of everything before it
_SEAL_BYTES = {_CHECKSUM: 8, _MAC: TAG_BYTES}
_NOTIF_PREFIX = b"ringserve-kv/2 "


@dataclass(frozen=True)
class PoolLayout:
    """Where a KVCache's rows live in memory: enough for a peer to address any token of any layer.

    Row ``slot`` (block * block_size + offset) of layer ``l`` starts at
    ``k_addr + l * layer_stride + slot * row_bytes`` (and the same from ``v_addr``).
    """

    mem: str  # "DRAM" or "VRAM"
    device_id: int
    k_addr: int
    v_addr: int
    num_layers: int
    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def of(cls, cache: KVCache) -> PoolLayout:
        """The layout of a cache's K and V tensors ([layers, blocks, block_size, Hkv, D], contiguous)."""
        k, v = cache.k, cache.v
        if not (k.is_contiguous() and v.is_contiguous()):
            raise InvalidArgument("the KV cache tensors must be contiguous to register them with NIXL")
        layers, blocks, block_size, heads, dim = k.shape
        return cls(
            mem="VRAM" if k.is_cuda else "DRAM",
            device_id=k.device.index or 0,
            k_addr=k.data_ptr(),
            v_addr=v.data_ptr(),
            num_layers=layers,
            num_blocks=blocks,
            block_size=block_size,
            kv_heads=heads,
            head_dim=dim,
            dtype=str(k.dtype).removeprefix("torch."),
        )

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.kv_heads * self.head_dim * getattr(torch, self.dtype).itemsize

    @property
    def layer_stride(self) -> int:
        return self.num_blocks * self.block_size * self.row_bytes

    def check_compatible(self, other: PoolLayout) -> None:
        """Raise unless heads of ``other``'s rows can be copied byte for byte into this layout
        (the number of KV heads may differ: a TP rank holds some of them)."""
        mine = (self.num_layers, self.head_dim, self.dtype)
        theirs = (other.num_layers, other.head_dim, other.dtype)
        if mine != theirs:
            raise InvalidArgument(
                f"KV layouts differ (layers, head dim, dtype): here {mine}, peer {theirs}; "
                "run the prefill and decode tiers with the same model and --dtype"
            )


@dataclass(frozen=True)
class Landing:
    """Where one decode rank takes one request's KV: what the decode side's Reserve answer carries.

    The sender may write cache positions [0, num_tokens) of ``block_table``; ``epoch`` names the
    reservation (unique for the decode worker's life) and goes back in every notification;
    ``incarnation`` orders the runs of a peer that restarts under the same agent name; only the
    prefill group ``prefill_group`` (its registry id) admits the landing, once, before ``expires``
    (Unix time; 0: no expiry).
    """

    agent: str
    incarnation: int
    metadata: bytes
    layout: PoolLayout
    request_id: str
    epoch: int
    block_table: tuple[int, ...]
    num_tokens: int
    expires: float = 0.0
    prefill_group: str = ""

    def to_bytes(self, key: bytes | None = None) -> bytes:
        """Versioned bytes for a gRPC ``bytes`` field, sealed with an HMAC under ``key`` (the
        deployment secret), or checksummed without one."""
        header = json.dumps(
            {
                "agent": self.agent,
                "incarnation": self.incarnation,
                "layout": dataclasses.asdict(self.layout),
                "request_id": self.request_id,
                "epoch": self.epoch,
                "num_tokens": self.num_tokens,
                "expires": self.expires,
                "prefill_group": self.prefill_group,
            },
            separators=(",", ":"),
        ).encode()
        blocks = np.asarray(self.block_table, dtype="<u4").tobytes()
        kind = _MAC if key else _CHECKSUM
        head = _HEAD.pack(_MAGIC, LANDING_VERSION, kind, len(header), len(self.metadata))
        body = head + header + self.metadata + blocks
        return body + (tag(key, body) if key else xxhash.xxh3_64_digest(body))

    @classmethod
    def from_bytes(cls, data: bytes, key: bytes | None = None) -> Landing:
        """Parse and verify; corrupt, truncated, foreign or (with ``key``, the deployment secret)
        unsigned or forged bytes raise before anything reaches NIXL."""
        what = "the NIXL landing descriptor (pass the decode worker's Reserve answer through unchanged)"
        if len(data) < _HEAD.size + _SEAL_BYTES[_CHECKSUM] or data[:4] != _MAGIC:
            raise InvalidArgument(f"{what} is not one: {len(data)} bytes, wrong magic")
        magic, version, kind, header_len, md_len = _HEAD.unpack_from(data)
        if version != LANDING_VERSION:
            raise FailedPrecondition(
                f"{what} has version {version}, this ringserve reads {LANDING_VERSION}: "
                "run the same ringserve version on the prefill and decode tiers"
            )
        body = cls._unseal(data, kind, key, what)
        blocks_at = _HEAD.size + header_len + md_len
        if blocks_at > len(body) or (len(body) - blocks_at) % 4:
            raise InvalidArgument(f"{what} is malformed: section lengths do not add up")
        try:
            header = json.loads(body[_HEAD.size : _HEAD.size + header_len])
            layout = PoolLayout(**header["layout"])
            landing = cls(
                agent=str(header["agent"]),
                incarnation=int(header["incarnation"]),
                metadata=bytes(body[_HEAD.size + header_len : blocks_at]),
                layout=layout,
                request_id=str(header["request_id"]),
                epoch=int(header["epoch"]),
                block_table=tuple(np.frombuffer(body[blocks_at:], dtype="<u4").tolist()),
                num_tokens=int(header["num_tokens"]),
                expires=float(header["expires"]),
                prefill_group=str(header["prefill_group"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(f"{what} is malformed: {type(e).__name__}: {e}") from e
        if landing.num_tokens > len(landing.block_table) * layout.block_size:
            raise InvalidArgument(f"{what} is malformed: {landing.num_tokens} tokens do not fit its blocks")
        return landing

    @staticmethod
    def _unseal(data: bytes, kind: int, key: bytes | None, what: str) -> bytes:
        """The sealed body of ``data``, once its seal checks out under ``key`` (or as a checksum)."""
        if key and kind != _MAC:
            raise PermissionDenied(
                f"{what} is not signed with the deployment secret: give the decode tier the same "
                "--deployment-secret-file as this prefill group"
            )
        if not key and kind == _MAC:
            raise FailedPrecondition(
                f"{what} is signed, but this prefill group has no deployment secret: give it the decode "
                "tier's --deployment-secret-file"
            )
        size = _SEAL_BYTES.get(kind, 0)
        if not size or len(data) < _HEAD.size + size:
            raise InvalidArgument(f"{what} is corrupt or truncated: {len(data)} bytes, seal kind {kind}")
        body, seal = data[:-size], data[-size:]
        if key and not verify(key, body, seal):
            raise PermissionDenied(f"{what} fails its MAC: forged, altered, or signed with another deployment's secret")
        if not key and xxhash.xxh3_64_digest(body) != seal:
            raise InvalidArgument(f"{what} is corrupt or truncated: checksum mismatch over {len(data)} bytes")
        return body


def check_rows(what: str, table_len: int, block_size: int, start: int, count: int, limit: int | None = None) -> None:
    """Raise InvalidArgument unless rows [start, start + count) lie in [0, limit or the table's capacity)."""
    end_limit = table_len * block_size if limit is None else limit
    if count < 1 or start < 0 or start + count > end_limit:
        raise InvalidArgument(f"{what} rows [{start}, {start + count}) are outside [0, {end_limit})")


def landing_bytes(
    template: Landing,
    request_id: str,
    epoch: int,
    block_table: Sequence[int],
    num_tokens: int,
    prefill_group: str = "",
    key: bytes | None = None,
    expires: float = 0.0,
) -> bytes:
    """A reservation's landing: an endpoint's ``template`` with the request's epoch, blocks, prefill
    group and expiry filled in, sealed under ``key`` (the deployment secret) if given."""
    check_rows("landing", len(block_table), template.layout.block_size, 0, num_tokens)
    return dataclasses.replace(
        template,
        request_id=request_id,
        epoch=epoch,
        block_table=tuple(block_table),
        num_tokens=num_tokens,
        expires=expires,
        prefill_group=prefill_group,
    ).to_bytes(key)


@dataclass(frozen=True)
class Landed:
    """Rows [first_position, first_position + count) of a request's reservation ``epoch`` landed
    (``first_position`` counts from the start of the receiving rank's share): of its local KV heads
    ``heads``, or whole rows (None)."""

    request_id: str
    epoch: int
    transfer_id: str
    first_position: int
    count: int
    sender: str
    heads: range | None = None


@dataclass(frozen=True)
class Done:
    """The sender will WRITE nothing more for a request's reservation ``epoch``."""

    request_id: str
    epoch: int
    sender: str


def landed_notif(
    request_id: str, epoch: int, transfer_id: str, first_position: int, count: int, heads: range | None = None
) -> bytes:
    body = {"request_id": request_id, "epoch": epoch, "transfer_id": transfer_id, "first": first_position}
    if heads is not None:  # part of each row: these local KV heads (whole rows say nothing)
        body["heads"] = [heads.start, heads.stop]
    return _NOTIF_PREFIX + json.dumps({**body, "count": count}, separators=(",", ":")).encode()


def done_notif(request_id: str, epoch: int) -> bytes:
    body = {"done": True, "request_id": request_id, "epoch": epoch}
    return _NOTIF_PREFIX + json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Pull:
    """A sender has rows packed in its staging buffer for heads ``heads`` (the receiver's local
    indices, strided in its pool) of rows [first_position, first_position + count) of a
    reservation, to go into ``blocks`` from position ``offset`` (the reservation's blocks holding
    those rows). The receiver answers a grant (``Reply``), takes the sender's WRITE of up to that
    many rows into its own staging buffer (``Staged``), stores them and answers "stored".
    ``metadata`` and ``incarnation`` let the receiver reach the sender's agent."""

    request_id: str
    epoch: int
    transfer_id: str
    first_position: int
    count: int
    heads: range
    blocks: tuple[int, ...]
    offset: int
    sender: str
    incarnation: int
    metadata: bytes


@dataclass(frozen=True)
class Reply:
    """The receiver's answer to a ``Pull``: ``stage`` "grant" (WRITE the first ``rows`` packed rows
    to ``k_addr`` / ``v_addr`` of its staging buffer, laid out as in the sender's) or "stored"
    (those rows are in its pool); ``error``: why it cannot."""

    request_id: str
    epoch: int
    transfer_id: str
    sender: str
    stage: str
    rows: int = 0
    k_addr: int = 0
    v_addr: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Staged:
    """A sender's WRITE into the receiver's staging buffer for a ``Pull`` is complete."""

    request_id: str
    epoch: int
    transfer_id: str
    sender: str


def pull_notif(pull: Pull) -> bytes:
    body = dataclasses.asdict(pull) | {"heads": [pull.heads.start, pull.heads.stop], "metadata": pull.metadata.hex()}
    return _NOTIF_PREFIX + json.dumps({"pull": True, **body}, separators=(",", ":")).encode()


def reply_notif(reply: Reply) -> bytes:
    body = {"reply": True, **dataclasses.asdict(reply)}
    del body["sender"]  # the receiving agent knows who sent it
    return _NOTIF_PREFIX + json.dumps(body, separators=(",", ":")).encode()


def staged_notif(request_id: str, epoch: int, transfer_id: str) -> bytes:
    body = {"staged": True, "request_id": request_id, "epoch": epoch, "transfer_id": transfer_id}
    return _NOTIF_PREFIX + json.dumps(body, separators=(",", ":")).encode()


def _parse_pull(sender: str, body: dict) -> Pull:
    heads = range(int(body["heads"][0]), int(body["heads"][1]))
    return Pull(
        str(body["request_id"]),
        int(body["epoch"]),
        str(body["transfer_id"]),
        int(body["first_position"]),
        int(body["count"]),
        heads,
        tuple(int(b) for b in body["blocks"]),
        int(body["offset"]),
        sender,
        int(body["incarnation"]),
        bytes.fromhex(body["metadata"]),
    )


def _parse_reply(sender: str, body: dict) -> Reply:
    error = None if body["error"] is None else str(body["error"])
    ids = (str(body["request_id"]), int(body["epoch"]), str(body["transfer_id"]), sender, str(body["stage"]))
    return Reply(*ids, int(body["rows"]), int(body["k_addr"]), int(body["v_addr"]), error)


def parse_notif(sender: str, msg: bytes) -> Landed | Done | Pull | Reply | Staged | None:
    """A notification from ``sender``, or None for bytes that are not one of ours."""
    if not msg.startswith(_NOTIF_PREFIX):
        return None
    try:
        body = json.loads(msg[len(_NOTIF_PREFIX) :])
        if body.get("pull"):
            return _parse_pull(sender, body)
        if body.get("reply"):
            return _parse_reply(sender, body)
        if body.get("staged"):
            return Staged(str(body["request_id"]), int(body["epoch"]), str(body["transfer_id"]), sender)
        rid, epoch = str(body["request_id"]), int(body["epoch"])
        if body.get("done"):
            return Done(rid, epoch, sender)
        heads = range(int(body["heads"][0]), int(body["heads"][1])) if "heads" in body else None
        return Landed(rid, epoch, str(body["transfer_id"]), int(body["first"]), int(body["count"]), sender, heads)
    except (ValueError, KeyError, TypeError, IndexError):
        return None
