"""The TCP KV data path: a prefill rank pushes a run of KV rows to a decode rank's receiver.

One message per move: a length-prefixed JSON header (request id, first cache position, shape,
dtype, byte count, xxh3 checksum), then the payload. The receiver verifies length and checksum,
hands the rows to its sink (which writes them into reserved blocks), and answers ok or an error,
so the sender knows the KV has landed before the first token is returned.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable

import torch
import xxhash

from ringserve.errors import RingserveError, Unavailable, error_from_code

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")

# sink(request_id, first_position, kv [layers, 2, n, Hkv, D]); raises RingserveError to refuse.
Sink = Callable[[str, int, torch.Tensor], None]


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
    return json.loads(_recv_exact(sock, n))


def send_kv(address: str, request_id: str, first_position: int, kv: torch.Tensor, timeout_s: float = 30.0) -> int:
    """Push ``kv`` rows to the receiver at ``address``; returns bytes sent once they have landed."""
    payload = kv.detach().cpu().contiguous().view(torch.uint8).numpy()
    header = {
        "request_id": request_id,
        "first_position": first_position,
        "shape": list(kv.shape),
        "dtype": str(kv.dtype).removeprefix("torch."),
        "nbytes": payload.nbytes,
        "checksum": xxhash.xxh3_64_hexdigest(payload),
    }
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            _send_msg(sock, header)
            sock.sendall(memoryview(payload).cast("B"))
            reply = _recv_msg(sock)
    except (OSError, ConnectionError, ValueError) as e:
        raise Unavailable(f"KV transfer of request {request_id} to {address} failed: {e}") from e
    if not reply.get("ok"):
        raise error_from_code(
            reply.get("code", "INTERNAL"),
            f"decode side refused KV of request {request_id}: {reply.get('error')}",
        )
    return payload.nbytes


class KVReceiver:
    """Accepts KV pushes on a TCP port (one thread per connection) and hands them to ``sink``."""

    def __init__(self, sink: Sink, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None):
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                receiver._handle(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.sink = sink
        self.server = socketserver.ThreadingTCPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.address = f"{advertise_host or host}:{self.server.server_address[1]}"
        self.bytes_received = 0
        self._thread = threading.Thread(target=self.server.serve_forever, name="kv-receiver", daemon=True)
        self._thread.start()

    def _handle(self, sock: socket.socket) -> None:
        try:
            header = _recv_msg(sock)
            payload = _recv_exact(sock, int(header["nbytes"]))
        except (OSError, ConnectionError, ValueError, KeyError) as e:
            log.warning("KV receiver: dropped a broken transfer: %s", e)
            return
        rid = header.get("request_id", "?")
        try:
            if xxhash.xxh3_64_hexdigest(payload) != header["checksum"]:
                raise RingserveError(f"checksum mismatch on {len(payload)} bytes")
            dtype = getattr(torch, header["dtype"])
            kv = torch.frombuffer(payload, dtype=torch.uint8).view(dtype).reshape(header["shape"])
            self.sink(rid, int(header["first_position"]), kv)
            self.bytes_received += len(payload)
            reply = {"ok": True}
        except RingserveError as e:
            reply = {"ok": False, "error": str(e), "code": e.code}
        except Exception as e:  # a bug on this side: tell the sender instead of hanging it
            log.exception("KV receiver: request %s failed", rid)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "code": "INTERNAL"}
        try:
            _send_msg(sock, reply)
        except OSError:
            pass

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
