"""The NIXL KV data path: a prefill rank WRITEs KV rows straight into a decode rank's reserved blocks.

One ``NixlEndpoint`` per worker process owns one NIXL agent (UCX backend) and registers that
process's paged KV pool once (DRAM on CPU, VRAM on GPU). The two sides meet through the
services' own gRPC calls, never through NIXL's listener:

1. decode: ``landing(request_id, block_table, num_tokens)`` -> bytes for the Reserve answer: the
   agent's name and metadata, the pool's byte layout and the reservation's block ids, versioned
   and checksummed (``Landing``);
2. prefill: ``push(block_table, src_start, count, landing, dst_start)`` loads the peer's metadata
   (once per peer incarnation), turns the token rows into descriptors (rows contiguous in memory
   on both sides become one descriptor), WRITEs them with a notification naming the request and
   the transfer, and returns once NIXL reports the WRITE complete: like the TCP path, the
   sender knows the KV has landed before it returns;
3. decode: the notification reaches ``on_landed`` (``Landed``: request, transfer, rows), which
   is how the decode side learns the rows are there (``LandingTally`` counts them per request).

NIXL's progress thread is off (it busy-polls: ~3x slower on a 2-core machine), so each endpoint
runs its own progress loop: both agents must keep polling or the first transfer never
completes. Every NIXL exception and every timeout becomes ``Unavailable`` (or a caller error for
bad input). NIXL can be poisoned for an agent name by metadata that fails half-way through
loading, so metadata reaches NIXL only after the landing's checksum and version pass; a peer
that restarts (same name, new metadata) is removed and re-added, and a landing from an earlier
incarnation of a peer is refused without touching the agent.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from ringserve.engine.kv_cache import KVCache
from ringserve.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

LANDING_VERSION = 1
_MAGIC = b"RSKV"
_HEAD = struct.Struct("<4sHII")  # magic, version, header JSON bytes, metadata bytes
_DIGEST = 8  # xxh3-64 of everything before it
_NOTIF_PREFIX = b"ringserve-kv/1 "
TRANSPORTS = ("auto", "nixl", "tcp")


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
        """Raise unless rows of ``other`` can be copied byte for byte into this layout."""
        mine = (self.num_layers, self.kv_heads, self.head_dim, self.dtype)
        theirs = (other.num_layers, other.kv_heads, other.head_dim, other.dtype)
        if mine != theirs:
            raise InvalidArgument(
                f"KV layouts differ (layers, kv heads, head dim, dtype): here {mine}, peer {theirs}; "
                "run the prefill and decode tiers with the same model and --dtype"
            )


@dataclass(frozen=True)
class Landing:
    """Where one decode rank takes one request's KV: what the decode side's Reserve answer carries.

    The sender may write cache positions [0, num_tokens) of ``block_table``; ``incarnation`` orders
    the runs of a peer that restarts under the same agent name.
    """

    agent: str
    incarnation: int
    metadata: bytes
    layout: PoolLayout
    request_id: str
    block_table: tuple[int, ...]
    num_tokens: int

    def to_bytes(self) -> bytes:
        """Versioned, checksummed bytes for a gRPC ``bytes`` field."""
        header = json.dumps(
            {
                "agent": self.agent,
                "incarnation": self.incarnation,
                "layout": dataclasses.asdict(self.layout),
                "request_id": self.request_id,
                "num_tokens": self.num_tokens,
            },
            separators=(",", ":"),
        ).encode()
        blocks = np.asarray(self.block_table, dtype="<u4").tobytes()
        body = _HEAD.pack(_MAGIC, LANDING_VERSION, len(header), len(self.metadata)) + header + self.metadata + blocks
        return body + xxhash.xxh3_64_digest(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> Landing:
        """Parse and verify; corrupt, truncated or foreign bytes raise before anything reaches NIXL."""
        what = "the NIXL landing descriptor (pass the decode worker's Reserve answer through unchanged)"
        if len(data) < _HEAD.size + _DIGEST or data[:4] != _MAGIC:
            raise InvalidArgument(f"{what} is not one: {len(data)} bytes, wrong magic")
        magic, version, header_len, md_len = _HEAD.unpack_from(data)
        if version != LANDING_VERSION:
            raise FailedPrecondition(
                f"{what} has version {version}, this ringserve reads {LANDING_VERSION}: "
                "run the same ringserve version on the prefill and decode tiers"
            )
        body, digest = data[:-_DIGEST], data[-_DIGEST:]
        if xxhash.xxh3_64_digest(body) != digest:
            raise InvalidArgument(f"{what} is corrupt or truncated: checksum mismatch over {len(data)} bytes")
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
                block_table=tuple(np.frombuffer(body[blocks_at:], dtype="<u4").tolist()),
                num_tokens=int(header["num_tokens"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(f"{what} is malformed: {type(e).__name__}: {e}") from e
        if landing.num_tokens > len(landing.block_table) * layout.block_size:
            raise InvalidArgument(f"{what} is malformed: {landing.num_tokens} tokens do not fit its blocks")
        return landing


@dataclass(frozen=True)
class Landed:
    """A notification from a sender: rows [first_position, first_position + count) of a request landed."""

    request_id: str
    transfer_id: str
    first_position: int
    count: int
    sender: str


def _notif(request_id: str, transfer_id: str, first_position: int, count: int) -> bytes:
    body = {"request_id": request_id, "transfer_id": transfer_id, "first": first_position, "count": count}
    return _NOTIF_PREFIX + json.dumps(body, separators=(",", ":")).encode()


def _parse_notif(sender: str, msg: bytes) -> Landed | None:
    if not msg.startswith(_NOTIF_PREFIX):
        return None
    try:
        body = json.loads(msg[len(_NOTIF_PREFIX) :])
        return Landed(body["request_id"], body["transfer_id"], int(body["first"]), int(body["count"]), sender)
    except (ValueError, KeyError, TypeError):
        return None


def _slot_runs(table: np.ndarray, block_size: int, start: int, breaks: np.ndarray) -> np.ndarray:
    """Slots of cache positions ``start + breaks`` (every break inside a block of ``table``)."""
    pos = start + breaks
    return table[pos // block_size] * block_size + pos % block_size


def plan_descriptors(
    src: PoolLayout,
    src_table: Sequence[int],
    src_start: int,
    dst: PoolLayout,
    dst_table: Sequence[int],
    dst_start: int,
    count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Local and remote descriptors (rows of ``addr, bytes, device``) that copy ``count`` rows.

    Source positions [src_start, src_start + count) of ``src_table`` go to destination positions
    [dst_start, ...) of ``dst_table``, in every layer, K and V. The rows are cut wherever either
    side crosses a block boundary; consecutive pieces that are contiguous on both sides (blocks
    with consecutive ids) merge back into one descriptor, so a fresh, unfragmented pool moves
    each layer's K and V in one descriptor each.
    """
    src.check_compatible(dst)
    row = src.row_bytes
    src_t = np.asarray(src_table, dtype=np.int64)
    dst_t = np.asarray(dst_table, dtype=np.int64)
    # Offsets (from the first row) where the source or the destination enters a new block.
    src_cuts = np.arange((-src_start) % src.block_size, count, src.block_size)
    dst_cuts = np.arange((-dst_start) % dst.block_size, count, dst.block_size)
    breaks = np.union1d(np.union1d(src_cuts, dst_cuts), [0])
    lengths = np.diff(np.append(breaks, count))
    s_slot = _slot_runs(src_t, src.block_size, src_start, breaks)
    d_slot = _slot_runs(dst_t, dst.block_size, dst_start, breaks)
    # A piece continues the previous one when both its slots follow on directly.
    follows = np.zeros(len(breaks), dtype=bool)
    follows[1:] = (s_slot[1:] == s_slot[:-1] + lengths[:-1]) & (d_slot[1:] == d_slot[:-1] + lengths[:-1])
    heads = np.flatnonzero(~follows)
    run_len = np.add.reduceat(lengths, heads)
    s_off = s_slot[heads] * row
    d_off = d_slot[heads] * row
    nbytes = run_len * row

    def descs(layout: PoolLayout, offsets: np.ndarray) -> np.ndarray:
        bases = np.array(
            [
                base + layer * layout.layer_stride
                for layer in range(layout.num_layers)
                for base in (layout.k_addr, layout.v_addr)
            ],
            dtype=np.uint64,
        )
        out = np.empty((len(bases) * len(offsets), 3), dtype=np.uint64)
        out[:, 0] = (bases[:, None] + offsets.astype(np.uint64)[None, :]).reshape(-1)
        out[:, 1] = np.tile(nbytes.astype(np.uint64), len(bases))
        out[:, 2] = layout.device_id
        return out

    return descs(src, s_off), descs(dst, d_off)


def _check_rows(what: str, table_len: int, block_size: int, start: int, count: int, limit: int | None = None) -> None:
    end_limit = table_len * block_size if limit is None else limit
    if count < 1 or start < 0 or start + count > end_limit:
        raise InvalidArgument(f"{what} rows [{start}, {start + count}) are outside [0, {end_limit})")


class LandingTally:
    """An ``on_landed`` callback that counts landed rows per request, for ``wait``-ing on them."""

    def __init__(self):
        self._rows: dict[str, int] = {}
        self._seen: dict[str, set[str]] = {}
        self._cond = threading.Condition()

    def __call__(self, landed: Landed) -> None:
        with self._cond:
            seen = self._seen.setdefault(landed.request_id, set())
            if landed.transfer_id in seen:  # a repeated notification must not count twice
                return
            seen.add(landed.transfer_id)
            self._rows[landed.request_id] = self._rows.get(landed.request_id, 0) + landed.count
            self._cond.notify_all()

    def rows(self, request_id: str) -> int:
        """Rows of ``request_id`` whose notification has arrived."""
        with self._cond:
            return self._rows.get(request_id, 0)

    def wait(self, request_id: str, num_tokens: int, timeout_s: float) -> None:
        """Block until ``num_tokens`` rows of the request have landed; DeadlineExceeded otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._rows.get(request_id, 0) >= num_tokens, timeout_s):
                raise DeadlineExceeded(
                    f"only {self._rows.get(request_id, 0)} of {num_tokens} KV rows of request {request_id} "
                    f"arrived within {timeout_s:.1f} s; the prefill side failed or is slow (see its log)"
                )

    def discard(self, request_id: str) -> None:
        """Forget a request (its reservation ended)."""
        with self._cond:
            self._rows.pop(request_id, None)
            self._seen.pop(request_id, None)


def landing_bytes(template: Landing, request_id: str, block_table: Sequence[int], num_tokens: int) -> bytes:
    """A reservation's landing: an endpoint's ``template`` with the request's blocks filled in."""
    _check_rows("landing", len(block_table), template.layout.block_size, 0, num_tokens)
    return dataclasses.replace(
        template, request_id=request_id, block_table=tuple(block_table), num_tokens=num_tokens
    ).to_bytes()


@dataclass
class _Peer:
    fingerprint: bytes
    incarnation: int


class NixlEndpoint:
    """This process's NIXL agent with its KV pool registered; sends (``push``) and receives (``landing``).

    Thread-safe: every agent call holds one lock. The progress loop polls for notifications
    (which also drives UCX) every ``poll_interval_s``: 1 ms costs ~2% of a core when idle (0.1 ms:
    ~7%) and only delays notifications, since a push polls its own transfer without sleeping.
    ``on_landed`` runs on that loop's thread: keep it short.
    """

    def __init__(
        self,
        cache: KVCache,
        name: str | None = None,
        on_landed: Callable[[Landed], None] | None = None,
        poll_interval_s: float = 1e-3,
    ):
        from nixl._api import nixl_agent, nixl_agent_config

        if "NIXL_LOG_LEVEL" not in os.environ:  # NIXL's INFO lines go to stdout; ours below say it all
            logging.getLogger("nixl").setLevel(logging.WARNING)
        self.cache = cache
        self.name = name or f"ringserve-{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.incarnation = time.time_ns()
        self.on_landed = on_landed
        self.poll_interval_s = poll_interval_s
        self.layout = PoolLayout.of(cache)
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._inflight = 0
        try:
            self._agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
            if "UCX" not in self._agent.backends:
                raise RuntimeError("NIXL has no UCX backend plugin")
            self._registered = self._agent.register_memory([cache.k, cache.v])
            self.metadata = self._agent.get_agent_metadata()
        except Exception as e:
            raise Unavailable(
                f"NIXL agent {self.name} could not start: {type(e).__name__}: {e}; use --kv-transfer tcp"
            ) from e
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._progress, name="nixl-progress", daemon=True)
        self._thread.start()
        log.info(
            "kv_transfer=nixl agent=%s mem=%s device=%d pool_bytes=%d metadata_bytes=%d",
            self.name,
            self.layout.mem,
            self.layout.device_id,
            2 * self.layout.num_layers * self.layout.layer_stride,
            len(self.metadata),
        )

    # --- decode side -------------------------------------------------------------------------

    def landing(self, request_id: str, block_table: Sequence[int], num_tokens: int) -> bytes:
        """The bytes a Reserve answer carries so that a sender can write rows [0, num_tokens) of a
        reservation whose cache positions live in ``block_table``."""
        return landing_bytes(self.template(), request_id, block_table, num_tokens)

    def template(self) -> Landing:
        """This endpoint's part of every landing (picklable): a group leader builds its other
        ranks' landings from their templates with ``landing_bytes``."""
        return Landing(self.name, self.incarnation, self.metadata, self.layout, "", (), 0)

    def _progress(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    notifs = self._agent.get_new_notifs()
            except Exception:  # keep polling: a broken peer must not stop everyone's progress
                log.exception("NIXL progress: get_new_notifs failed")
                notifs = {}
            for sender, messages in notifs.items():
                for msg in messages:
                    landed = _parse_notif(sender, msg)
                    if landed is None:
                        log.warning("NIXL: dropped an unknown notification from agent %s (%d bytes)", sender, len(msg))
                    elif self.on_landed is not None:
                        try:
                            self.on_landed(landed)
                        except Exception:
                            log.exception("request_id=%s on_landed failed", landed.request_id)
            time.sleep(self.poll_interval_s)

    # --- prefill side ------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Transfers posted and not yet finished or released (0 when idle)."""
        with self._lock:
            return self._inflight

    def push(
        self,
        block_table: Sequence[int],
        src_start: int,
        count: int,
        landing: Landing | bytes,
        dst_start: int,
        transfer_id: str | None = None,
        timeout_s: float = 30.0,
    ) -> int:
        """WRITE rows [src_start, src_start + count) of a local sequence (``block_table``) to cache
        positions [dst_start, dst_start + count) of a landing; returns the bytes written once NIXL
        reports the WRITE complete. The notification names the landing's request and the transfer.

        Raises InvalidArgument/FailedPrecondition for bad input (rows out of range, foreign or
        corrupt landing, mismatched layouts) and Unavailable when the transfer fails or does not
        finish within ``timeout_s`` (a dead, restarted or stuck decode worker).
        """
        if isinstance(landing, bytes | bytearray | memoryview):
            landing = Landing.from_bytes(bytes(landing))
        rid = landing.request_id
        _check_rows(f"request {rid}: source", len(block_table), self.layout.block_size, src_start, count)
        _check_rows(
            f"request {rid}: destination",
            len(landing.block_table),
            landing.layout.block_size,
            dst_start,
            count,
            limit=landing.num_tokens,
        )
        local, remote = plan_descriptors(
            self.layout, block_table, src_start, landing.layout, landing.block_table, dst_start, count
        )
        transfer_id = transfer_id or uuid.uuid4().hex[:12]
        nbytes = int(local[:, 1].sum())
        if self.layout.mem == "VRAM":  # the kernels that wrote this KV must be done before NIXL reads it
            torch.cuda.current_stream(self.cache.k.device).synchronize()
        deadline = time.monotonic() + timeout_s
        where = f"request {rid} transfer {transfer_id}: NIXL WRITE of {nbytes} bytes to agent {landing.agent}"
        with self._lock:
            fingerprint = self._connect(landing)
            try:
                handle = self._agent.initialize_xfer(
                    "WRITE",
                    self._agent.get_xfer_descs(local, self.layout.mem),
                    self._agent.get_xfer_descs(remote, landing.layout.mem),
                    landing.agent,
                    _notif(rid, transfer_id, dst_start, count),
                )
            except Exception as e:
                self._forget(landing.agent, fingerprint)
                raise Unavailable(f"{where} could not start: {type(e).__name__}: {e}") from e
            self._inflight += 1
        try:
            self._run(handle, deadline, where, landing.agent, fingerprint, timeout_s)
        finally:
            self._release(handle)
        return nbytes

    def _run(self, handle, deadline: float, where: str, peer: str, fingerprint: bytes, timeout_s: float) -> None:
        """Post the transfer and poll it to completion, an error, or the deadline."""
        try:
            with self._lock:
                state = self._agent.transfer(handle)
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not complete after {timeout_s:.1f} s")
                time.sleep(0)  # let the progress loop and the caller's other threads in
                with self._lock:
                    state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL reported transfer state {state}")
        except Exception as e:
            # The peer is dead, restarted or stuck: forget it, so that its next landing (a
            # restarted worker's new metadata, or the same one after a network blip) connects anew.
            with self._lock:
                self._forget(peer, fingerprint)
            raise Unavailable(
                f"{where} failed: {type(e).__name__}: {e}; the decode worker died, restarted or is "
                "unreachable: release the request's reservation and retry it"
            ) from e

    def _release(self, handle) -> None:
        with self._lock:
            self._inflight -= 1
            try:
                handle.release()
            except Exception as e:  # NIXL keeps a handle it cannot abort and frees it with the agent
                log.warning("NIXL: could not release a transfer handle: %s: %s", type(e).__name__, e)

    def _connect(self, landing: Landing) -> bytes:
        """Load the landing's agent metadata unless it is loaded already (lock held); returns its
        fingerprint."""
        fingerprint = hashlib.blake2b(landing.metadata, digest_size=16).digest()
        peer = self._peers.get(landing.agent)
        if peer is not None and peer.fingerprint == fingerprint:
            return fingerprint
        if peer is not None and landing.incarnation < peer.incarnation:
            raise Unavailable(
                f"request {landing.request_id}: the landing comes from an earlier run of decode agent "
                f"{landing.agent}, which has restarted since; reserve again on the running worker"
            )
        if peer is not None:
            log.info("NIXL: agent %s restarted (new metadata); reloading it", landing.agent)
            self._forget(landing.agent, peer.fingerprint)
        try:
            loaded = self._agent.add_remote_agent(landing.metadata)
        except Exception as e:
            raise Unavailable(
                f"request {landing.request_id}: NIXL refused the metadata of agent {landing.agent}: "
                f"{type(e).__name__}: {e}; restart that decode worker or use --kv-transfer tcp"
            ) from e
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
        if loaded != landing.agent:
            self._agent.remove_remote_agent(loaded)
            raise InvalidArgument(f"the landing names agent {landing.agent} but its metadata is agent {loaded}")
        self._peers[landing.agent] = _Peer(fingerprint, landing.incarnation)
        return fingerprint

    def _forget(self, agent: str, fingerprint: bytes) -> None:
        """Drop a peer from NIXL and from the cache (lock held) unless it has been reloaded since
        (a newer incarnation); its next landing loads it again."""
        peer = self._peers.get(agent)
        if peer is None or peer.fingerprint != fingerprint:
            return
        del self._peers[agent]
        try:
            self._agent.remove_remote_agent(agent)
        except Exception as e:
            log.warning("NIXL: removing agent %s failed: %s: %s", agent, type(e).__name__, e)

    def close(self) -> None:
        """Stop the progress loop, disconnect peers and deregister the pool."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for agent, peer in list(self._peers.items()):
                self._forget(agent, peer.fingerprint)
            try:
                self._agent.deregister_memory(self._registered)
            except Exception as e:
                log.warning("NIXL: deregistering the KV pool failed: %s: %s", type(e).__name__, e)


@functools.cache
def available() -> str | None:
    """None if NIXL works in this process (it imports and a loopback WRITE is byte-exact), else why not.

    Run once per process: the self-test creates a throwaway agent.
    """
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except Exception as e:  # ImportError, or a broken wheel raising something else
        return f"nixl does not import ({type(e).__name__}: {e}); pip install nixl"
    try:
        agent = nixl_agent(f"ringserve-selftest-{os.getpid()}", nixl_agent_config(enable_prog_thread=False))
        src = torch.arange(1024, dtype=torch.int32)
        dst = torch.zeros_like(src)
        agent.register_memory([src, dst])
        handle = agent.initialize_xfer(
            "WRITE", agent.get_xfer_descs(src), agent.get_xfer_descs(dst), agent.name, b"selftest"
        )
        state = agent.transfer(handle)
        deadline = time.monotonic() + 5.0
        while state == "PROC" and time.monotonic() < deadline:
            state = agent.check_xfer_state(handle)
        handle.release()
        if state != "DONE" or not torch.equal(src, dst):
            return f"the NIXL loopback self-test did not complete (state {state})"
    except Exception as e:
        return f"the NIXL loopback self-test failed: {type(e).__name__}: {e}"
    return None


def select_transport(setting: str) -> str:
    """The KV transport for ``kv_transfer = auto | nixl | tcp``: "nixl" or "tcp", logged.

    ``auto`` takes NIXL when ``available()``, else TCP; ``nixl`` insists and raises
    FailedPrecondition when NIXL cannot run here.
    """
    if setting not in TRANSPORTS:
        raise InvalidArgument(f"kv_transfer must be one of {', '.join(TRANSPORTS)}, got {setting!r}")
    if setting == "tcp":
        log.info("kv_transfer=tcp (configured)")
        return "tcp"
    why_not = available()
    if why_not is None:
        log.info("kv_transfer=nixl (%s)", setting)
        return "nixl"
    if setting == "nixl":
        raise FailedPrecondition(f"kv_transfer=nixl but NIXL cannot run here: {why_not}; or use --kv-transfer tcp")
    log.warning("kv_transfer=tcp (auto: %s)", why_not)
    return "tcp"
