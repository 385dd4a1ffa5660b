"""The TCP KV data path: a prefill rank pushes runs of KV rows to a decode rank's receiver.

A connection carries one move as frames: a length-prefixed JSON header (request id, reservation
epoch, transfer id, first cache position, rows, the receiver's KV heads they fill when not all of
them, shape, dtype, byte count, xxh3 checksum and, when the deployment has a secret, an
HMAC-SHA256 of all that under it), then the payload; the receiver
answers each frame ok or an error. The receiver trusts nothing: a header is bounded, its MAC is
checked (a frame without a valid one is dropped and counted, ``reason="unauthenticated"``; the
checksum it covers then vouches for the payload), ``admit`` checks it against a live reservation
(its epoch, its rows, its byte count) before a byte of payload is allocated, and an idle
connection is closed after a timeout.
The sender sends bounded slices of rows, so it never holds a whole shard in one buffer.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import xxhash

from ringserve.engine.kv_cache import KVCache
from ringserve.errors import InvalidArgument, PermissionDenied, RingserveError, Unavailable, error_from_code
from ringserve.kv_transfer.secret import tag, verify
from ringserve.metrics import KV_DROPPED

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 64 << 10  # a header is a few hundred bytes; anything longer is not ours
SLICE_BYTES = 64 << 20  # the sender gathers and sends at most this much KV at a time


@dataclass(frozen=True)
class Frame:
    """What a frame's header claims: rows [first_position, first_position + count) of a request's
    reservation ``epoch``, ``nbytes`` of payload."""

    request_id: str
    epoch: int
    transfer_id: str
    first_position: int
    count: int
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    checksum: str
    heads: range | None = None  # the receiver's local KV heads these rows fill; None: whole rows

    @classmethod
    def parse(cls, header: dict) -> Frame:
        try:
            heads = header.get("heads")
            frame = cls(
                str(header["request_id"]),
                int(header["epoch"]),
                str(header["transfer_id"]),
                int(header["first_position"]),
                int(header["count"]),
                tuple(int(n) for n in header["shape"]),
                str(header["dtype"]),
                int(header["nbytes"]),
                str(header["checksum"]),
                None if heads is None else range(int(heads[0]), int(heads[1])),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise InvalidArgument(f"malformed KV frame header: {type(e).__name__}: {e}") from e
        if not isinstance(getattr(torch, frame.dtype, None), torch.dtype):
            raise InvalidArgument(f"KV frame of request {frame.request_id}: unknown dtype {frame.dtype!r}")
        return frame

    def check_fits(self, cache: KVCache) -> None:
        """Raise InvalidArgument unless this frame's payload is ``count`` rows of its heads (whole
        rows: every head) in ``cache``'s layers, head dim and dtype, and exactly their bytes."""
        layers, _, _, kv_heads, dim = cache.k.shape
        heads = range(kv_heads) if self.heads is None else self.heads
        if not heads or heads.start < 0 or heads.stop > kv_heads:
            raise InvalidArgument(
                f"KV frame of request {self.request_id}: heads {heads} are outside this rank's {kv_heads} KV heads"
            )
        expected = (layers, 2, self.count, len(heads), dim)
        if self.shape != expected or self.dtype != str(cache.k.dtype).removeprefix("torch."):
            raise InvalidArgument(
                f"KV frame shape {self.shape} {self.dtype} does not match this model's {expected} {cache.k.dtype}"
            )
        nbytes = self.count * cache.bytes_per_token * len(heads) // kv_heads
        if self.nbytes != nbytes:
            raise InvalidArgument(
                f"KV frame of request {self.request_id} claims {self.nbytes} bytes for {self.count} rows; "
                f"they take {nbytes}"
            )


def store_rows(cache: KVCache, slots: torch.Tensor, kv: torch.Tensor, heads: range | None = None) -> None:
    """Write rows ``kv`` [layers, 2, n, heads, D] into ``cache`` at flat ``slots``: whole rows, or
    only the local KV heads ``heads`` of each."""
    kv = kv.to(cache.k.device)
    for layer in range(kv.shape[0]):
        if heads is None:
            cache.write(layer, slots, kv[layer, 0], kv[layer, 1])
        else:
            for pool, part in ((cache.k, kv[layer, 0]), (cache.v, kv[layer, 1])):
                pool[layer].view(-1, *pool.shape[-2:])[slots, heads.start : heads.stop] = part.to(pool.dtype)


# admit(frame): raise RingserveError to refuse a frame before its payload is read.
Admit = Callable[[Frame], None]
# sink(frame, kv [layers, 2, n, heads, D]): store the rows; raise RingserveError to refuse.
Sink = Callable[[Frame, torch.Tensor], None]


def _signed(header: dict) -> bytes:
    """The bytes a frame's MAC covers: every header field but the MAC, in a canonical order."""
    return json.dumps({k: v for k, v in header.items() if k != "mac"}, sort_keys=True, separators=(",", ":")).encode()


def check_frame_mac(header: dict, key: bytes | None) -> None:
    """Raise PermissionDenied unless ``header`` carries a valid MAC under ``key`` (no key: nothing to check)."""
    if key is None:
        return
    given = header.get("mac")
    try:
        valid = isinstance(given, str) and verify(key, _signed(header), bytes.fromhex(given))
    except ValueError:
        valid = False
    if not valid:
        raise PermissionDenied(
            "KV frame without a valid MAC: the sender lacks this deployment's secret "
            "(give both tiers the same --deployment-secret-file)"
        )


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return buf


def _send_msg(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_msg(sock: socket.socket) -> dict:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"a {n}-byte header (at most {MAX_HEADER_BYTES})")
    return json.loads(_recv_exact(sock, n))


def row_slices(rows: int, bytes_per_row: int, limit: int = SLICE_BYTES) -> list[tuple[int, int]]:
    """[start, end) runs of at most ``limit`` bytes (at least one row each) covering ``rows``."""
    step = max(1, limit // max(1, bytes_per_row))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def send_kv(
    address: str,
    request_id: str,
    epoch: int,
    transfer_id: str,
    slices: Iterable[tuple[int, torch.Tensor]],
    timeout_s: float = 30.0,
    key: bytes | None = None,
    heads: range | None = None,
) -> int:
    """Push ``(first_position, kv [layers, 2, n, Hkv, D])`` slices over one connection to the
    receiver at ``address``; returns bytes sent once every slice has landed. ``slices`` may be a
    generator: each slice is gathered only when its turn comes. With ``key`` (the deployment
    secret) each header carries its MAC. With ``heads`` (the receiver's local KV heads the rows
    fill) each slice holds only those heads of its rows."""
    host, port = address.rsplit(":", 1)
    sent = 0
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            for first_position, kv in slices:
                payload = kv.detach().cpu().contiguous().view(torch.uint8).numpy()
                header = {
                    "request_id": request_id,
                    "epoch": epoch,
                    "transfer_id": transfer_id,
                    "first_position": first_position,
                    "count": kv.shape[2],
                    "shape": list(kv.shape),
                    "dtype": str(kv.dtype).removeprefix("torch."),
                    "nbytes": payload.nbytes,
                    "checksum": xxhash.xxh3_64_hexdigest(payload),
                }
                if heads is not None:
                    header["heads"] = [heads.start, heads.stop]
                if key is not None:
                    header["mac"] = tag(key, _signed(header)).hex()
                _send_msg(sock, header)
                sock.sendall(memoryview(payload).cast("B"))
                reply = _recv_msg(sock)
                if not reply.get("ok"):
                    raise error_from_code(
                        reply.get("code", "INTERNAL"),
                        f"decode side refused KV of request {request_id}: {reply.get('error')}",
                    )
                sent += payload.nbytes
    except (OSError, ConnectionError, ValueError) as e:
        raise Unavailable(f"KV transfer of request {request_id} to {address} failed: {type(e).__name__}: {e}") from e
    return sent


class KVReceiver:
    """Accepts KV pushes on a TCP port (one thread per connection): each frame is checked by
    ``admit``, verified, and handed to ``sink``. With ``frame_key`` (the deployment secret) a frame
    must carry a valid MAC first. ``dropped`` counts refused frames and broken or idle connections
    by reason."""

    def __init__(
        self,
        admit: Admit,
        sink: Sink,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        idle_timeout_s: float = 60.0,
        frame_key: bytes | None = None,
    ):
        from ringserve.registry import advertised_address

        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                receiver._serve(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.admit, self.sink, self.idle_timeout_s, self.frame_key = admit, sink, idle_timeout_s, frame_key
        self.server = socketserver.ThreadingTCPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.address = advertised_address(host, advertise_host, self.server.server_address[1])
        if advertise_host is None and host in ("0.0.0.0", "::", ""):
            log.info("KV receiver listens on %s and advertises %s (set --advertise-host to change)", host, self.address)
        self.dropped: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.server.serve_forever, name="kv-receiver", daemon=True)
        self._thread.start()

    def _drop(self, reason: str, what: str) -> None:
        with self._lock:
            self.dropped[reason] += 1
        KV_DROPPED.labels(reason).inc()
        log.warning("KV receiver: %s", what)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(self.idle_timeout_s)  # an idle or stalled peer must not pin this thread
        while True:
            try:
                header = _recv_msg(sock)
            except TimeoutError:
                self._drop("idle", f"closed a connection idle for {self.idle_timeout_s:.0f} s")
                return
            except (ConnectionError, OSError, ValueError) as e:
                if not isinstance(e, ConnectionError) or "after 0 of" not in str(e):  # not a clean close
                    self._drop("broken", f"dropped a broken connection: {type(e).__name__}: {e}")
                return
            if not self._frame(sock, header):
                return

    def _frame(self, sock: socket.socket, header: dict) -> bool:
        """Receive one frame and answer it; False when the connection must close."""
        try:
            check_frame_mac(header, self.frame_key)
        except PermissionDenied as e:
            self._drop("unauthenticated", f"dropped a frame: {e}")
            self._reply(sock, {"ok": False, "error": str(e), "code": e.code})
            return False
        try:
            frame = Frame.parse(header)
            self.admit(frame)  # before a byte of payload is allocated
        except RingserveError as e:
            self._drop("refused", f"refused a frame: {e}")
            self._reply(sock, {"ok": False, "error": str(e), "code": e.code})
            return False  # its payload stays unread: the connection cannot go on
        try:
            payload = _recv_exact(sock, frame.nbytes)
        except (OSError, ConnectionError) as e:
            self._drop("broken", f"request {frame.request_id}: the payload broke off: {type(e).__name__}: {e}")
            return False
        try:
            if xxhash.xxh3_64_hexdigest(payload) != frame.checksum:
                raise InvalidArgument(f"checksum mismatch on {len(payload)} bytes")
            kv = torch.frombuffer(payload, dtype=torch.uint8).view(getattr(torch, frame.dtype)).reshape(frame.shape)
            self.sink(frame, kv)
            reply = {"ok": True}
        except RingserveError as e:
            self._drop("refused", f"request {frame.request_id}: refused rows: {e}")
            reply = {"ok": False, "error": str(e), "code": e.code}
        except Exception as e:  # a bug on this side: tell the sender instead of hanging it
            log.exception("KV receiver: request %s failed", frame.request_id)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "code": "INTERNAL"}
        return self._reply(sock, reply) and reply["ok"]

    @staticmethod
    def _reply(sock: socket.socket, reply: dict) -> bool:
        try:
            _send_msg(sock, reply)
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
