"""Choosing pass-KV or pass-Q for a pass (Yang et al. 2024, §3.6, Algorithm 1 refined).

Roofline of one pass with T new and P cached tokens over N ranks, NH query and NKV KV heads,
e bytes per element, attention compute rate C (FLOP/s per rank) and ring bandwidth BW (B/s):

- pass-KV's transfer hides behind its attention when T >= N*C*NKV*e / (2*NH*BW)   (eq. 2);
- moving Q instead of KV is cheaper when the miss rate T/(T+P) < 2*NKV/NH          (eq. 1),
  less what pass-Q's all-to-all costs, 4*T*BW/(N*C*e), which sits on the critical path.

So: pass-KV if T >= N*C*NKV*e/(2*NH*BW) or T/(T+P) >= 2*NKV/NH - 4*T*BW/(N*C*e); else pass-Q.
C and BW are measured on the group (``measure_rates``) or given in the config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringserve.engine.attention import attend
from ringserve.errors import InvalidArgument

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "pass_kv", "pass_q")


@dataclass(frozen=True)
class Rates:
    """Measured attention compute (FLOP/s per rank) and ring bandwidth (bytes/s per link)."""

    compute: float
    bandwidth: float


def choose_strategy(
    strategy: str,
    num_new: int,
    num_cached: int,
    world: int,
    n_heads: int,
    n_kv_heads: int,
    elem_bytes: int,
    rates: Rates,
) -> str:
    """Resolve ``auto`` to pass_kv or pass_q by the refined rule; explicit choices pass through."""
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"unknown CP strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy != "auto":
        return strategy
    if world == 1 or num_new == 0:
        return "pass_kv"  # nothing travels: the two are the same computation
    c, bw = rates.compute, rates.bandwidth
    kv_hidden = num_new >= world * c * n_kv_heads * elem_bytes / (2 * n_heads * bw)
    miss_rate = num_new / (num_new + num_cached)
    q_threshold = 2 * n_kv_heads / n_heads - 4 * num_new * bw / (world * c * elem_bytes)
    choice = "pass_kv" if kv_hidden or miss_rate >= q_threshold else "pass_q"
    log.debug(
        "CP strategy %s: T=%d P=%d N=%d miss=%.3f (pass-Q below %.3f), pass-KV hidden: %s",
        choice,
        num_new,
        num_cached,
        world,
        miss_rate,
        q_threshold,
        kv_hidden,
    )
    return choice


def measure_rates(
    group: dist.ProcessGroup | None,
    device: torch.device,
    dtype: torch.dtype,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
) -> Rates:
    """Time one causal attention and one ring transfer on this group; every rank gets the minimum.

    Fixed iteration counts on every rank, so the collectives match.
    """
    from ringserve.prefill_service.ring import RingComm

    # Pass-like sizes: small problems measure launch latency, not rates.
    tokens = 16384 if device.type == "cuda" else 512
    q = torch.randn(tokens, n_heads, head_dim, device=device, dtype=dtype)
    kv = torch.randn(tokens, n_kv_heads, head_dim, device=device, dtype=dtype)

    def timed(fn, iters: int) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / iters

    attn_s = timed(lambda: attend(q, kv, kv, causal=True), 5)
    compute = 2 * tokens * tokens * n_heads * head_dim / attn_s  # causal: half of 4*T*T*D
    bandwidth = float("inf")
    if dist.get_world_size(group) > 1:
        comm = RingComm(group)
        msg = torch.empty((256 if device.type == "cuda" else 8) << 20, dtype=torch.uint8, device=device)

        def ring_step():
            comm.send_recv(msg)
            comm.wait()

        bandwidth = msg.numel() / timed(ring_step, 5)
    both = torch.tensor([-compute, -bandwidth], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)  # max of negatives: the slowest rank
    return Rates(compute=-float(both[0]), bandwidth=-float(both[1]))
