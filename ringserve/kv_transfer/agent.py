"""One process's NIXL agent: one lock around every call, the peers it has loaded, transfers run to
completion, and every NIXL failure as ``Unavailable`` naming the transfer.

Metadata reaches NIXL only after the landing's checksum and version pass (metadata that fails
half-way poisons an agent name); a peer that restarts (same name, new metadata) is removed and
re-added, and metadata from an earlier incarnation is refused. A transfer that fails or times
out forgets its peer, so that the peer's next landing connects anew.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ringserve.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Remote:
    """A peer as a transfer needs it: its agent name, run, NIXL metadata and the memory it serves."""

    agent: str
    incarnation: int
    metadata: bytes
    mem: str  # "DRAM" or "VRAM"


@dataclass
class _Peer:
    fingerprint: bytes
    incarnation: int


class Agent:
    """A NIXL agent (UCX backend, no progress thread of its own) with ``memory`` registered."""

    def __init__(self, name: str, memory: Sequence[torch.Tensor], mem: str):
        from nixl._api import nixl_agent, nixl_agent_config

        self.name, self.mem = name, mem
        self.descriptors_posted = 0  # over every transfer posted here: how well moves coalesce
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        try:
            self._agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
            if "UCX" not in self._agent.backends:
                raise RuntimeError("NIXL has no UCX backend plugin")
            self._registered = self._agent.register_memory(list(memory))
            self.metadata = self._agent.get_agent_metadata()
        except Exception as e:
            raise Unavailable(
                f"NIXL agent {name} could not start: {type(e).__name__}: {e}; use --kv-transfer tcp"
            ) from e

    def notifications(self) -> dict[str, list[bytes]]:
        """New notifications by sender; polling them also drives UCX."""
        with self._lock:
            return self._agent.get_new_notifs()

    def write(
        self,
        peer: Remote,
        local: np.ndarray,
        remote: np.ndarray,
        note: bytes,
        where: str,
        deadline: float,
        timeout_s: float,
    ) -> int:
        """One WRITE from descriptors ``local`` here to ``remote`` at ``peer`` with notification
        ``note``; returns the bytes moved once NIXL reports it complete, by ``deadline``
        (monotonic; that of a ``timeout_s`` for the whole move)."""
        nbytes = int(local[:, 1].sum())
        where = f"{where}: NIXL WRITE of {nbytes} bytes to agent {peer.agent}"
        with self._lock:
            fingerprint = self.connect(peer, where)
            self.descriptors_posted += len(local)
            try:
                handle = self._agent.initialize_xfer(
                    "WRITE",
                    self._agent.get_xfer_descs(local, self.mem),
                    self._agent.get_xfer_descs(remote, peer.mem),
                    peer.agent,
                    note,
                )
            except Exception as e:
                self.forget(peer.agent, fingerprint)
                raise Unavailable(f"{where} could not start: {type(e).__name__}: {e}") from e
        try:
            self._run(handle, deadline, where, peer.agent, fingerprint, timeout_s)
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
                self.forget(peer, fingerprint)
            raise Unavailable(
                f"{where} failed: {type(e).__name__}: {e}; the decode worker died, restarted or is "
                "unreachable: release the request's reservation and retry it"
            ) from e

    def _release(self, handle) -> None:
        with self._lock:
            try:
                handle.release()
            except Exception as e:  # NIXL keeps a handle it cannot abort and frees it with the agent
                log.warning("NIXL: could not release a transfer handle: %s: %s", type(e).__name__, e)

    def send(self, peer: Remote, message: bytes, where: str) -> None:
        """A notification alone; raises Unavailable if NIXL cannot send it."""
        with self._lock:
            fingerprint = self.connect(peer, where)
            try:
                self._agent.send_notif(peer.agent, message)
            except Exception as e:
                self.forget(peer.agent, fingerprint)
                raise Unavailable(f"{where} to agent {peer.agent} failed: {type(e).__name__}: {e}") from e

    def connect(self, peer: Remote, where: str) -> bytes:
        """Load a peer's metadata unless it is loaded already (lock held); returns its fingerprint."""
        fingerprint = hashlib.blake2b(peer.metadata, digest_size=16).digest()
        known = self._peers.get(peer.agent)
        if known is not None and known.fingerprint == fingerprint:
            return fingerprint
        if known is not None and peer.incarnation < known.incarnation:
            raise Unavailable(
                f"{where}: the landing comes from an earlier run of agent {peer.agent}, which has restarted "
                "since; reserve again on the running worker"
            )
        if known is not None:
            log.info("NIXL: agent %s restarted (new metadata); reloading it", peer.agent)
            self.forget(peer.agent, known.fingerprint)
        try:
            loaded = self._agent.add_remote_agent(peer.metadata)
        except Exception as e:
            raise Unavailable(
                f"{where}: NIXL refused the metadata of agent {peer.agent}: {type(e).__name__}: {e}; restart "
                "that worker or use --kv-transfer tcp"
            ) from e
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
        if loaded != peer.agent:
            self._agent.remove_remote_agent(loaded)
            raise InvalidArgument(f"{where}: the peer names agent {peer.agent} but its metadata is agent {loaded}")
        self._peers[peer.agent] = _Peer(fingerprint, peer.incarnation)
        return fingerprint

    def forget(self, agent: str, fingerprint: bytes) -> None:
        """Drop a peer from NIXL and from the cache (lock held) unless it has been reloaded since
        (a newer incarnation); its next landing loads it again."""
        known = self._peers.get(agent)
        if known is None or known.fingerprint != fingerprint:
            return
        del self._peers[agent]
        try:
            self._agent.remove_remote_agent(agent)
        except Exception as e:
            log.warning("NIXL: removing agent %s failed: %s: %s", agent, type(e).__name__, e)

    def lost(self, peer: Remote) -> None:
        """Forget ``peer`` after a failure seen outside a transfer (its next landing reconnects)."""
        with self._lock:
            self.forget(peer.agent, hashlib.blake2b(peer.metadata, digest_size=16).digest())

    def close(self) -> None:
        """Disconnect every peer and deregister the memory."""
        with self._lock:
            for agent, known in list(self._peers.items()):
                self.forget(agent, known.fingerprint)
            try:
                self._agent.deregister_memory(self._registered)
            except Exception as e:
                log.warning("NIXL: deregistering the KV pool failed: %s: %s", type(e).__name__, e)
