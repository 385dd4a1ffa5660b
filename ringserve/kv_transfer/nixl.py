"""The NIXL KV data path: a prefill rank WRITEs KV rows straight into a decode rank's reserved blocks.

One ``NixlEndpoint`` per worker process owns one NIXL agent (UCX backend, kv_transfer/agent.py)
and registers that process's paged KV pool and a staging buffer once (DRAM on CPU, VRAM on GPU).
The two sides meet through the services' own gRPC calls, never through NIXL's listener: the
decode side hands out a ``Landing`` (kv_transfer/landing.py) in its Reserve answer; the prefill
side ``push``es rows into it (descriptors from kv_transfer/descriptors.py) with a notification
naming the request, the reservation's epoch, the transfer and the rows, and returns once NIXL
reports the WRITE complete; after a request's last push the prefill leader sends
``notify_done``. The decode side gets both through ``on_landed`` / ``on_done``.

A TP rank's head sub-range of each row is strided in a pool ([.., slot, head, dim]). The sender
packs it in its staging buffer (kv_transfer/staging.py): into whole destination rows it then
WRITEs as above; into a sub-range of the destination's heads it sends a ``Pull`` instead: the
decode side grants room in its own staging buffer, the sender WRITEs the packed rows there, and
the decode side stores them into those heads of its rows, reports them landed and answers
"stored", on which the push goes on.

NIXL's progress thread is off (it busy-polls: ~3x slower on a 2-core machine), so each endpoint
runs its own progress loop: both agents must keep polling or the first transfer never
completes. Every NIXL exception and every timeout becomes ``Unavailable`` (or a caller error for
bad input).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import torch

from ringserve.engine.kv_cache import KVCache
from ringserve.errors import FailedPrecondition, InvalidArgument, Unavailable
from ringserve.kv_transfer.agent import Agent, Remote
from ringserve.kv_transfer.descriptors import check_heads, plan_descriptors
from ringserve.kv_transfer.landing import (
    Done,
    Landed,
    Landing,
    PoolLayout,
    Pull,
    Reply,
    Staged,
    check_rows,
    done_notif,
    landed_notif,
    landing_bytes,
    parse_notif,
    pull_notif,
    reply_notif,
    staged_notif,
)
from ringserve.kv_transfer.staging import DEFAULT_STAGING_BYTES, Staging

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "nixl", "tcp")
PULL_TIMEOUT_S = 60.0  # how long a receiver waits for a granted WRITE (the sender gives up at its own timeout)


class NixlEndpoint:
    """This process's NIXL agent with its KV pool registered; sends (``push``) and receives (``landing``).

    Thread-safe (the agent holds one lock around every call). The progress loop polls for
    notifications (which also drives UCX) every ``poll_interval_s``: 1 ms costs ~2% of a core when
    idle (0.1 ms: ~7%) and only delays notifications, since a push polls its own transfer without
    sleeping. ``on_landed`` and ``on_done`` run on that loop's thread (or the pull thread): keep
    them short.
    """

    def __init__(
        self,
        cache: KVCache,
        name: str | None = None,
        on_landed: Callable[[Landed], None] | None = None,
        on_done: Callable[[Done], None] | None = None,
        poll_interval_s: float = 1e-3,
        landing_key: bytes | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
    ):
        if "NIXL_LOG_LEVEL" not in os.environ:  # NIXL's INFO lines go to stdout; ours below say it all
            logging.getLogger("nixl").setLevel(logging.WARNING)
        self.cache = cache
        self.name = name or f"ringserve-{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.incarnation = time.time_ns()
        self.on_landed, self.on_done = on_landed, on_done
        self.landing_key = landing_key  # the deployment secret: landings signed, and verified before a WRITE
        self.poll_interval_s = poll_interval_s
        self.layout = PoolLayout.of(cache)
        # Registered with the pool, so the agent's metadata never changes: packed head pieces
        # (staging.py), written from here or into here (Pull). One user at a time.
        self._staging = Staging(cache, staging_bytes)
        self._staging_lock = threading.Lock()
        # Pulls in flight by (peer, request, epoch, transfer): this side's waiting for replies, and
        # the peer's waiting for its WRITE into this side's staging buffer; pulls to serve, in order.
        self._replies: dict[tuple, queue.SimpleQueue[Reply]] = {}
        self._staged: dict[tuple, queue.SimpleQueue[Staged]] = {}
        self._pulls: queue.Queue[Pull | None] = queue.Queue()
        self._agent = Agent(self.name, [cache.k, cache.v, self._staging.buffer], self.layout.mem)
        self.metadata = self._agent.metadata
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._progress, name="nixl-progress", daemon=True),
            threading.Thread(target=self._serve_pulls, name="nixl-pulls", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info(
            "kv_transfer=nixl agent=%s mem=%s device=%d pool_bytes=%d staging_bytes=%d metadata_bytes=%d",
            self.name,
            self.layout.mem,
            self.layout.device_id,
            2 * self.layout.num_layers * self.layout.layer_stride,
            staging_bytes,
            len(self.metadata),
        )

    @property
    def descriptors_posted(self) -> int:
        """Descriptors of every WRITE this side has posted."""
        return self._agent.descriptors_posted

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
                notifs = self._agent.notifications()
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
        elif isinstance(note, Pull):
            self._pulls.put(note)
        elif isinstance(note, Reply | Staged):
            waiters = self._replies if isinstance(note, Reply) else self._staged
            waiter = waiters.get((sender, note.request_id, note.epoch, note.transfer_id))
            if waiter is not None:
                waiter.put(note)
        else:
            _handle(self.on_done if isinstance(note, Done) else self.on_landed, note)

    def _serve_pulls(self) -> None:
        """The receiving side of pieces strided in this pool, one Pull at a time: grant room in the
        staging buffer, take the sender's WRITE there, store the rows into those heads of the
        pool's rows, report them landed (``on_landed``) and answer "stored"."""
        while (note := self._pulls.get()) is not None:
            where = f"request {note.request_id} transfer {note.transfer_id}"
            peer = Remote(note.sender, note.incarnation, note.metadata, self.layout.mem)
            key = (note.sender, note.request_id, note.epoch, note.transfer_id)
            self._staged[key] = staged = queue.SimpleQueue()
            answer = (note.request_id, note.epoch, note.transfer_id, self.name)
            try:
                stored = self._store_pull(note, peer, staged, where)
                _handle(self.on_landed, Landed(*answer[:3], note.first_position, stored, note.sender, note.heads))
                reply = Reply(*answer, "stored", stored)
            except Exception as e:
                log.warning(
                    "%s: storing rows pulled from agent %s failed: %s: %s", where, note.sender, type(e).__name__, e
                )
                reply = Reply(*answer, "stored", error=f"{type(e).__name__}: {e}")
            finally:
                del self._staged[key]
            try:
                self._agent.send(peer, reply_notif(reply), where)
            except Unavailable as e:  # the sender gives up at its timeout
                log.warning("%s: answering the pull failed: %s", where, e)

    def _store_pull(self, note: Pull, peer: Remote, staged: queue.SimpleQueue, where: str) -> int:
        """Grant the staging buffer to ``note``'s sender, wait for its WRITE and store what it wrote;
        returns the rows stored (the first ones of the Pull: as many as the buffer holds)."""
        rows_fit = note.offset + note.count <= len(note.blocks) * self.layout.block_size
        if not rows_fit or max(note.blocks, default=0) >= self.layout.num_blocks or note.offset < 0:
            raise InvalidArgument(f"rows [{note.offset}, +{note.count}) do not fit blocks {note.blocks}")
        check_heads(self.layout, note.heads, self.layout, note.heads)  # inside this pool's heads
        with self._staging_lock:
            n = min(note.count, self._staging.capacity(len(note.heads)))
            rows, packed = self._staging.packed(self.layout, n, len(note.heads))
            grant = Reply(
                note.request_id, note.epoch, note.transfer_id, self.name, "grant", n, packed.k_addr, packed.v_addr
            )
            self._agent.send(peer, reply_notif(grant), where)
            try:
                staged.get(timeout=PULL_TIMEOUT_S)
            except queue.Empty:
                # Keep the buffer a while longer: a WRITE still in flight must not land in the next pull's rows.
                with contextlib.suppress(queue.Empty):
                    staged.get(timeout=PULL_TIMEOUT_S)
                raise TimeoutError(f"the sender's WRITE did not come within {PULL_TIMEOUT_S:.0f} s") from None
            self._staging.scatter(rows, note.blocks, note.offset, note.heads)
            self._sync()  # stored before the rows count as landed
        return n

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
        only those heads of each row move, and the notification names ``dst_heads``. Head pieces go
        through the staging buffer, a bounded chunk (``staging_bytes``) at a time, each landing
        on its own (transfer ``<transfer_id>/<chunk>``): WRITEs into whole destination rows, pulls
        into a sub-range of the destination's heads.

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
        src_heads, dst_heads = check_heads(self.layout, src_heads, landing.layout, dst_heads)
        whole_src, whole_dst = len(src_heads) == self.layout.kv_heads, len(dst_heads) == landing.layout.kv_heads
        transfer_id = transfer_id or uuid.uuid4().hex[:12]
        deadline = time.monotonic() + timeout_s
        peer = Remote(landing.agent, landing.incarnation, landing.metadata, landing.layout.mem)
        where = f"request {rid} transfer {transfer_id}"
        if whole_src and whole_dst:  # rows as they lie, one descriptor per run of blocks of both sides
            self._sync()
            dst = (landing.layout, landing.block_table, dst_start)
            local, remote = plan_descriptors(self.layout, block_table, src_start, *dst, count)
            note = landed_notif(rid, landing.epoch, transfer_id, dst_start, count)
            return self._agent.write(peer, local, remote, note, where, deadline, timeout_s)
        sent = 0
        with self._staging_lock:  # head pieces, packed as whole rows of their heads
            for i, (a, n) in enumerate(self._staging.chunks(count, src_heads)):
                packed = self._staging.gather(self.layout, block_table, src_start + a, n, src_heads)
                self._sync()
                chunk = f"{transfer_id}/{i}"  # each chunk lands (and is counted) on its own
                if whole_dst:  # WRITE them into the destination's rows
                    dst = (landing.layout, landing.block_table, dst_start + a)
                    local, remote = plan_descriptors(packed, [0], 0, *dst, n)
                    note = landed_notif(rid, landing.epoch, chunk, dst_start + a, n)
                    sent += self._agent.write(peer, local, remote, note, where, deadline, timeout_s)
                else:  # strided there too: into the receiver's staging buffer, which stores them
                    sent += self._pull(landing, packed, chunk, dst_start + a, n, dst_heads, deadline, timeout_s)
        return sent

    def _pull(
        self,
        landing: Landing,
        packed: PoolLayout,
        chunk: str,
        first: int,
        count: int,
        heads: range,
        deadline: float,
        timeout_s: float,
    ) -> int:
        """Have the landing's agent store ``count`` packed rows (``packed``: where they lie here)
        into heads ``heads`` of its rows from ``first``, in pieces as large as its staging buffer:
        per piece a Pull, its grant, a WRITE into its staging buffer, its "stored". Returns the
        bytes written (staging lock held)."""
        bs = landing.layout.block_size
        peer = Remote(landing.agent, landing.incarnation, landing.metadata, landing.layout.mem)
        done = sent = 0
        while done < count:
            piece, at = f"{chunk}+{done}", first + done  # each piece lands (and is counted) on its own
            blocks = landing.block_table[at // bs : -(-(first + count) // bs)]
            ids = (landing.request_id, landing.epoch, piece)
            pull = Pull(*ids, at, count - done, heads, blocks, at % bs, self.name, self.incarnation, self.metadata)
            where = f"request {landing.request_id} transfer {piece}: a pull by agent {landing.agent}"
            key = (landing.agent, *ids)
            self._replies[key] = replies = queue.SimpleQueue()
            try:
                self._agent.send(peer, pull_notif(pull), where)
                grant = self._reply(replies, "grant", peer, deadline, timeout_s, where)
                there = dataclasses.replace(packed, k_addr=grant.k_addr, v_addr=grant.v_addr, block_size=grant.rows)
                local, remote = plan_descriptors(packed, [0], done, there, [0], 0, grant.rows)
                sent += self._agent.write(peer, local, remote, staged_notif(*ids), where, deadline, timeout_s)
                self._reply(replies, "stored", peer, deadline, timeout_s, where)
            finally:
                del self._replies[key]
            done += grant.rows
        return sent

    def _reply(
        self, replies: queue.SimpleQueue, stage: str, peer: Remote, deadline: float, timeout_s: float, where: str
    ) -> Reply:
        """The receiver's next reply to a pull, which must be ``stage`` without an error."""
        try:
            reply = replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self._agent.lost(peer)
            raise Unavailable(f"{where} failed: not complete after {timeout_s:.1f} s") from None
        if reply.error or reply.stage != stage:
            raise Unavailable(f"{where} failed: the decode worker could not store the rows: {reply.error}")
        return reply

    def _sync(self) -> None:
        """On GPU, wait for the kernels that wrote the KV (or the staging buffer) before NIXL reads it."""
        if self.layout.mem == "VRAM":
            torch.cuda.current_stream(self.cache.k.device).synchronize()

    def notify_done(self, landing: Landing | bytes) -> None:
        """Tell a landing's decode agent that this side WRITEs nothing more for its request and
        epoch, so the blocks it holds back (quarantine) can go. Raises Unavailable if NIXL cannot."""
        if isinstance(landing, bytes | bytearray | memoryview):
            landing = Landing.from_bytes(bytes(landing), self.landing_key)
        peer = Remote(landing.agent, landing.incarnation, landing.metadata, landing.layout.mem)
        where = f"request {landing.request_id}: the done notification"
        self._agent.send(peer, done_notif(landing.request_id, landing.epoch), where)

    def close(self) -> None:
        """Stop the progress and pull loops, disconnect peers and deregister the pool."""
        self._stop.set()
        self._pulls.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._agent.close()


def _handle(handler: Callable | None, note: Landed | Done) -> None:
    if handler is None:
        return
    try:
        handler(note)
    except Exception:
        log.exception("request_id=%s epoch=%d: handling a NIXL notification failed", note.request_id, note.epoch)


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
