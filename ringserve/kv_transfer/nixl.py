"""The NIXL KV data path: a prefill rank WRITEs KV rows straight into a decode rank's reserved blocks.

One ``NixlEndpoint`` per worker process owns one NIXL agent (UCX backend) and registers that
process's paged KV pool once (DRAM on CPU, VRAM on GPU). The two sides meet through the
services' own gRPC calls, never through NIXL's listener: the decode side hands out a
``Landing`` (kv_transfer/landing.py) in its Reserve answer; the prefill side ``push``es rows into
it (descriptors from kv_transfer/descriptors.py) with a notification naming the request, the
reservation's epoch, the transfer and the rows, and returns once NIXL reports the WRITE
complete; after a request's last push the prefill leader sends ``notify_done``. The decode side
gets both through ``on_landed`` / ``on_done``.

NIXL's progress thread is off (it busy-polls: ~3x slower on a 2-core machine), so each endpoint
runs its own progress loop: both agents must keep polling or the first transfer never
completes. Every NIXL exception and every timeout becomes ``Unavailable`` (or a caller error for
bad input). Metadata reaches NIXL only after the landing's checksum and version pass (metadata
that fails half-way poisons an agent name); a peer that restarts (same name, new metadata) is
removed and re-added, and a landing from an earlier incarnation is refused.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ringserve.engine.kv_cache import KVCache
from ringserve.errors import FailedPrecondition, InvalidArgument, Unavailable
from ringserve.kv_transfer.descriptors import plan_descriptors
from ringserve.kv_transfer.landing import (
    Done,
    Landed,
    Landing,
    PoolLayout,
    check_rows,
    done_notif,
    landed_notif,
    landing_bytes,
    parse_notif,
)

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "nixl", "tcp")


@dataclass
class _Peer:
    fingerprint: bytes
    incarnation: int


class NixlEndpoint:
    """This process's NIXL agent with its KV pool registered; sends (``push``) and receives (``landing``).

    Thread-safe: every agent call holds one lock. The progress loop polls for notifications
    (which also drives UCX) every ``poll_interval_s``: 1 ms costs ~2% of a core when idle (0.1 ms:
    ~7%) and only delays notifications, since a push polls its own transfer without sleeping.
    ``on_landed`` and ``on_done`` run on that loop's thread: keep them short.
    """

    def __init__(
        self,
        cache: KVCache,
        name: str | None = None,
        on_landed: Callable[[Landed], None] | None = None,
        on_done: Callable[[Done], None] | None = None,
        poll_interval_s: float = 1e-3,
        landing_key: bytes | None = None,
    ):
        from nixl._api import nixl_agent, nixl_agent_config

        if "NIXL_LOG_LEVEL" not in os.environ:  # NIXL's INFO lines go to stdout; ours below say it all
            logging.getLogger("nixl").setLevel(logging.WARNING)
        self.cache = cache
        self.name = name or f"ringserve-{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.incarnation = time.time_ns()
        self.on_landed, self.on_done = on_landed, on_done
        self.landing_key = landing_key  # the deployment secret: landings signed, and verified before a WRITE
        self.poll_interval_s = poll_interval_s
        self.layout = PoolLayout.of(cache)
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
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

    def landing(self, request_id: str, epoch: int, block_table: Sequence[int], num_tokens: int) -> bytes:
        """The bytes a Reserve answer carries so that a sender can write rows [0, num_tokens) of
        reservation ``epoch`` whose cache positions live in ``block_table``."""
        return landing_bytes(self.template(), request_id, epoch, block_table, num_tokens, key=self.landing_key)

    def template(self) -> Landing:
        """This endpoint's part of every landing (picklable): a group leader builds its other
        ranks' landings from their templates with ``landing_bytes``."""
        return Landing(self.name, self.incarnation, self.metadata, self.layout, "", 0, (), 0)

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
                    self._deliver(sender, msg)
            time.sleep(self.poll_interval_s)

    def _deliver(self, sender: str, msg: bytes) -> None:
        note = parse_notif(sender, msg)
        if note is None:
            log.warning("NIXL: dropped an unknown notification from agent %s (%d bytes)", sender, len(msg))
            return
        handler = self.on_done if isinstance(note, Done) else self.on_landed
        if handler is None:
            return
        try:
            handler(note)
        except Exception:
            log.exception("request_id=%s epoch=%d: handling a NIXL notification failed", note.request_id, note.epoch)

    # --- prefill side ------------------------------------------------------------------------

    def push(
        self,
        block_table: Sequence[int],
        src_start: int,
        count: int,
        landing: Landing | bytes,
        dst_start: int,
        transfer_id: str | None = None,
        timeout_s: float = 30.0,
        src_heads: range | None = None,
        dst_heads: range | None = None,
    ) -> int:
        """WRITE rows [src_start, src_start + count) of a local sequence (``block_table``) to cache
        positions [dst_start, dst_start + count) of a landing; returns the bytes written once NIXL
        reports the WRITE complete. The notification names the landing's request and epoch, the
        transfer and the rows. With head ranges (local KV head indices on each side; None: all),
        only those heads of each row move, and the notification names ``dst_heads``.

        Raises InvalidArgument/FailedPrecondition for bad input (rows out of range, foreign or
        corrupt landing, mismatched layouts) and Unavailable when the transfer fails or does not
        finish within ``timeout_s`` (a dead, restarted or stuck decode worker). With a
        ``landing_key``, landing bytes that fail their MAC raise PermissionDenied before any WRITE.
        """
        if isinstance(landing, bytes | bytearray | memoryview):
            landing = Landing.from_bytes(bytes(landing), self.landing_key)
        rid = landing.request_id
        check_rows(f"request {rid}: source", len(block_table), self.layout.block_size, src_start, count)
        check_rows(
            f"request {rid}: destination",
            len(landing.block_table),
            landing.layout.block_size,
            dst_start,
            count,
            limit=landing.num_tokens,
        )
        local, remote = plan_descriptors(
            self.layout,
            block_table,
            src_start,
            landing.layout,
            landing.block_table,
            dst_start,
            count,
            src_heads,
            dst_heads,
        )
        whole = dst_heads is None or len(dst_heads) == landing.layout.kv_heads
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
                    landed_notif(rid, landing.epoch, transfer_id, dst_start, count, None if whole else dst_heads),
                )
            except Exception as e:
                self._forget(landing.agent, fingerprint)
                raise Unavailable(f"{where} could not start: {type(e).__name__}: {e}") from e
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

    def notify_done(self, landing: Landing | bytes) -> None:
        """Tell a landing's decode agent that this side WRITEs nothing more for its request and
        epoch, so the blocks it holds back (quarantine) can go. Raises Unavailable if NIXL cannot."""
        if isinstance(landing, bytes | bytearray | memoryview):
            landing = Landing.from_bytes(bytes(landing), self.landing_key)
        with self._lock:
            fingerprint = self._connect(landing)
            try:
                self._agent.send_notif(landing.agent, done_notif(landing.request_id, landing.epoch))
            except Exception as e:
                self._forget(landing.agent, fingerprint)
                raise Unavailable(
                    f"request {landing.request_id}: the done notification to agent {landing.agent} failed: "
                    f"{type(e).__name__}: {e}"
                ) from e

    def _release(self, handle) -> None:
        with self._lock:
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
