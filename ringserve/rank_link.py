"""The rank link: how a group's leader starts and talks to its other ranks, for both kinds of
groups (CP prefill, KVP decode), whether a rank is a local child or a process on another host.

The leader listens (multiprocessing.connection: length-prefixed pickles, HMAC challenge on
connect); every other rank connects the same way, says its rank and gets the group's configuration
and torch.distributed rendezvous. A closed connection (EOF) is how either side learns the other is
gone. Pickles are accepted only from a peer that proved the key: the deployment secret's, or a
per-group random one for local children.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener
from typing import Any

from ringserve.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable
from ringserve.process_group import free_port

log = logging.getLogger(__name__)

LINK_KEY_LABEL = b"ringserve group link v1"


@dataclass(frozen=True)
class Hello:
    """A rank's first message to its leader."""

    rank: int
    world: int  # the group size it was started for


@dataclass(frozen=True)
class Welcome:
    """The leader's answer: what a rank needs to join the group."""

    init_method: str  # torch.distributed rendezvous (tcp://leader-host:port)
    config: Any  # the leader's service config: the group's one source of truth


@dataclass(frozen=True)
class RankLost:
    """Delivered by the leader's link in place of a message when a rank's connection ends."""

    rank: int
    who: str  # e.g. "prefill-rank1 (exit code -9)"


def local_ranks(configured: int | None, world: int) -> range:
    """The ranks other than the leader that it starts itself (``--local-ranks``, itself included;
    default: the whole group); the rest join from other hosts."""
    n = world if configured is None else configured
    if not 1 <= n <= world:
        raise InvalidArgument(f"--local-ranks must be 1..{world} (the group's ranks this process starts), got {n}")
    return range(1, n)


def link_key(secret: bytes | None) -> bytes:
    """The rank link's key: derived from the deployment secret (so ranks on other hosts can join),
    else random (only this process's own children can join)."""
    return hmac.new(secret, LINK_KEY_LABEL, hashlib.sha256).digest() if secret else os.urandom(32)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgument(f"--group-leader must be HOST:PORT (the leader's --group-host and port), got {address!r}")
    return host, int(port)


class LeaderLink:
    """The leader's side: listen, start the local ranks as child processes, admit every rank, then
    send typed messages to ranks and read theirs (``messages``: (rank, message) or (rank, RankLost))."""

    def __init__(self, name: str, world: int, host: str, port: int, secret: bytes | None):
        self.name, self.world, self.host = name, world, host
        self.key, self.keyed = link_key(secret), secret is not None
        self._listener = Listener((host, port), authkey=self.key)
        self._bound = self._listener.address
        self.address = f"{host}:{self._bound[1]}"
        self.init_method = f"tcp://{host}:{free_port(host)}"
        self.procs: list[mp.Process] = []  # local child ranks (ranks 1..len)
        self.messages: queue.Queue[tuple[int, Any]] = queue.Queue()
        self._conns: dict[int, Connection] = {}
        self._send_locks = {r: threading.Lock() for r in range(1, world)}
        self._closing = False
        self._listening = True

    def spawn(self, ranks: range, target: Callable[[RankLink], None]) -> None:
        """Start ``ranks`` here as child processes running ``target`` once joined (``spawn_ranks``)."""
        self.procs += spawn_ranks(self.name, self.world, self.address, self.key, [(r, target) for r in ranks], 60.0)

    def admit(self, config: Any, timeout_s: float) -> None:
        """Wait until every other rank has connected and said its rank, then welcome each with
        ``config``; raises Unavailable naming the ranks missing after ``timeout_s``."""
        if len(self.procs) < self.world - 1 and not self.keyed:
            self.close()
            raise FailedPrecondition(
                f"{self.name} group: ranks on other hosts (--local-ranks below the group size) need the "
                "deployment secret (--deployment-secret-file): it keys the rank link"
            )
        joined: queue.Queue[tuple[int, Connection] | BaseException] = queue.Queue()
        threading.Thread(target=self._accept, args=(joined,), name=f"{self.name}-accept", daemon=True).start()
        deadline = time.monotonic() + timeout_s
        try:
            while len(self._conns) < self.world - 1:
                try:
                    got = joined.get(timeout=0.2)
                except queue.Empty:
                    dead = [self._describe(p) for p in self.procs if not p.is_alive()]
                    if dead:
                        raise Unavailable(
                            f"{self.name} group: {', '.join(dead)} died during start-up; see its log"
                        ) from None
                    if time.monotonic() > deadline:
                        raise Unavailable(self._missing(timeout_s)) from None
                    continue
                if isinstance(got, BaseException):
                    raise Unavailable(f"{self.name} group: the rank link at {self.address} failed: {got}") from got
                rank, conn = got
                if rank in self._conns:
                    log.warning("%s group: rank %d joined twice; the second is refused", self.name, rank)
                    conn.close()
                    continue
                self._conns[rank] = conn
        finally:
            self._stop_listening()  # the group is formed (or failed): no one else joins
        for rank, conn in self._conns.items():
            conn.send(Welcome(self.init_method, config))
            threading.Thread(target=self._read, args=(rank, conn), name=f"{self.name}-link{rank}", daemon=True).start()

    def _missing(self, timeout_s: float) -> str:
        missing = [r for r in range(1, self.world) if r not in self._conns]
        local = {int(p.name.rsplit("rank", 1)[1]) for p in self.procs}
        remote = [r for r in missing if r not in local]
        hint = (
            f"; start each as `ringserve {self.name} --group-rank R --group-leader {self.address}` "
            "with this group's flags and deployment secret"
            if remote
            else ""
        )
        return (
            f"{self.name} group: rank(s) {', '.join(map(str, missing))} of {self.world} did not join at "
            f"{self.address} within {timeout_s:.0f} s{hint}"
        )

    def _accept(self, joined: queue.Queue) -> None:
        """Take connections until admission ends: each must prove the key and say a rank of this group."""
        while True:
            try:
                conn = self._listener.accept()
                hello = conn.recv() if conn.poll(10.0) else None
            except (AuthenticationError, EOFError, OSError) as e:
                if not self._listening:  # admission is over (``_stop_listening`` woke us)
                    return
                if isinstance(e, OSError) and not isinstance(e, ConnectionError):
                    joined.put(e)  # the listener itself failed
                    return
                log.warning("%s group: a rank link peer failed its handshake (%s); ignored", self.name, e)
                continue
            if not isinstance(hello, Hello) or hello.world != self.world or not 1 <= hello.rank < self.world:
                log.warning(
                    "%s group: refused a rank link peer that said %r (group of %d)", self.name, hello, self.world
                )
                conn.close()
                continue
            joined.put((hello.rank, conn))

    def _stop_listening(self) -> None:
        """End admission: wake the accept thread (a connection of our own) and close the listener."""
        if not self._listening:
            return
        self._listening = False
        with contextlib.suppress(OSError):
            socket.create_connection(self._bound, timeout=1.0).close()
        self._listener.close()

    def _read(self, rank: int, conn: Connection) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: close() closed it under this read
                if not self._closing:
                    self.messages.put((rank, RankLost(rank, self._who(rank))))
                return
            self.messages.put((rank, msg))

    def _who(self, rank: int) -> str:
        proc = next((p for p in self.procs if p.name == f"{self.name}-rank{rank}"), None)
        if proc is None:
            return f"{self.name}-rank{rank} (remote)"
        proc.join(timeout=2.0)  # its exit code, when it is the process that ended
        return self._describe(proc)

    @staticmethod
    def _describe(proc: mp.Process) -> str:
        return f"{proc.name} (exit code {proc.exitcode})"

    def send(self, rank: int, msg: Any) -> None:
        """Send a message to rank >= 1; a lost rank is reported by ``messages``, not here."""
        with self._send_locks[rank]:
            try:
                self._conns[rank].send(msg)
            except OSError:
                pass

    def broadcast(self, msg: Any) -> None:
        for rank in range(1, self.world):
            self.send(rank, msg)

    def lost(self) -> list[str]:
        """Local child ranks that have exited (a remote rank's loss arrives as RankLost)."""
        return [self._describe(p) for p in self.procs if not p.is_alive()]

    def close(self) -> None:
        """Hang up on every rank (their EOF tells them to stop) and reap the local ones."""
        self._closing = True
        self._stop_listening()
        for conn in self._conns.values():
            conn.close()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


class RankLink:
    """A rank's side: its welcome, and typed messages to and from the leader."""

    def __init__(self, conn: Connection, rank: int, welcome: Welcome):
        self.conn, self.rank, self.welcome = conn, rank, welcome
        self._lock = threading.Lock()

    @property
    def config(self) -> Any:
        return self.welcome.config

    def send(self, msg: Any) -> None:
        """Send to the leader (from any thread); a gone leader is seen by ``recv``."""
        with self._lock:
            try:
                self.conn.send(msg)
            except OSError:
                pass

    def recv(self) -> Any | None:
        """The leader's next message, or None once it has hung up or died."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def close(self) -> None:
        self.conn.close()


def join_group(address: str, rank: int, world: int, key: bytes, timeout_s: float) -> RankLink:
    """Connect to the leader's rank link at ``address`` (retrying until it listens, for ranks that
    start first) as ``rank`` of ``world``; returns once welcomed."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = Client((host, port), authkey=key)
            break
        except AuthenticationError as e:
            raise PermissionDenied(
                f"rank {rank}: the group leader at {address} refused this rank's key; "
                "start every rank with the same deployment secret"
            ) from e
        except OSError as e:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"rank {rank}: no group leader answered at {address} within {timeout_s:.0f} s ({e})"
                ) from e
            time.sleep(0.2)
    conn.send(Hello(rank, world))
    try:  # the leader welcomes every rank once all have joined, or hangs up on failure
        welcome = conn.recv()
    except EOFError:
        raise Unavailable(
            f"rank {rank}: the group leader at {address} refused this rank (wrong rank or group size?)"
        ) from None
    return RankLink(conn, rank, welcome)


def spawn_ranks(
    name: str, world: int, address: str, key: bytes, ranks: list[tuple[int, Callable[[RankLink], None]]],
    timeout_s: float,
) -> list[mp.Process]:
    """Start each (rank, target) as a child process (spawn: no fork of this process's threads) that
    joins the leader at ``address`` and runs ``target`` once welcomed; this host's CPU threads are
    shared between the children and this process. Used by a leader for its local ranks and by a
    process that runs several ranks of a host (``launch.run_rank``)."""
    import torch

    threads = max(1, torch.get_num_threads() // (len(ranks) + 1))
    torch.set_num_threads(threads)
    ctx = mp.get_context("spawn")
    procs = []
    for rank, target in ranks:
        proc = ctx.Process(
            target=_child_main,
            args=(target, name, rank, world, address, key, threads, timeout_s),
            name=f"{name}-rank{rank}",
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    return procs


def _child_main(
    target: Callable[[RankLink], None],
    name: str,
    rank: int,
    world: int,
    address: str,
    key: bytes,
    threads: int,
    timeout_s: float,
) -> None:
    from ringserve.logs import setup_logging

    setup_logging(f"{name}-rank{rank}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the leader stops us
    import torch

    torch.set_num_threads(threads)
    link = join_group(address, rank, world, key, timeout_s=timeout_s)
    try:
        target(link)
    finally:
        link.close()
