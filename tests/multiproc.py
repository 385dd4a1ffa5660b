"""Run a function on N real processes joined by torch.distributed (gloo), and collect results."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback

import torch

from ringserve.process_group import free_port


def _child(fn, rank, world, port, timeout_s, args, queue):
    torch.set_num_threads(1)  # N ranks share two cores
    try:
        from ringserve.process_group import init_group

        init_group(rank, world, f"tcp://127.0.0.1:{port}", torch.device("cpu"), timeout_s)
        # Plain pickle: tensors travel by value, not as shared memory that dies with this process.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException as e:  # report everything, including RingserveError, to the parent
        queue.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout_s: float = 30.0, join: int | None = None, wait_s: float = 300.0):
    """Start ``join`` (default ``world``) ranks of a ``world``-rank group; return per-rank results.

    A rank's result is ("ok", value), ("error", (type name, message, traceback)) or, for a rank
    that exited without reporting, ("died", (exit code, "", "")); None if it hung past ``wait_s``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world, port, timeout_s, args, queue), daemon=True)
        for r in range(world if join is None else join)
    ]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + wait_s
    try:
        # Until every rank has reported or exited (a crashed rank reports nothing).
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                rank, status, value = queue.get(timeout=0.5)
                results[rank] = (status, pickle.loads(value) if status == "ok" else value)
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in results and not p.is_alive() and queue.empty():
                        results[r] = ("died", (f"exit code {p.exitcode}", "", ""))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results.get(r) for r in range(len(procs))]


def values(results) -> list:
    """The ranks' return values; fails the test with a rank's traceback if any rank failed."""
    failed = [
        f"rank {r} failed: {v[0]}: {v[1]}\n{v[2]}" for r, (status, v) in enumerate(results) if status != "ok"
    ]
    if failed:
        raise AssertionError("\n".join(failed))
    return [v for _, v in results]
