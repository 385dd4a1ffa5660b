"""Tensor parallelism: which attention heads each TP rank holds.

The convention every part shares (model shards, KV caches, KV handoff): TP size ``T``, rank ``t``.
Query heads split evenly. KV heads split evenly when there are at least ``T`` of them; when there
are fewer, each rank holds one KV head and ``T / Hkv`` consecutive ranks hold the same one
(replicated), so a rank's query heads always attend to KV heads it holds.
"""

from __future__ import annotations


def check_tp(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """Raise ValueError unless ``tp`` ranks can split these heads by the convention above."""
    if tp < 1:
        raise ValueError(f"tensor parallel size must be at least 1, got {tp}")
    if num_heads % tp:
        raise ValueError(f"{num_heads} attention heads do not split across {tp} TP ranks: pick a TP size dividing them")
    if num_kv_heads >= tp and num_kv_heads % tp:
        raise ValueError(f"{num_kv_heads} KV heads do not split across {tp} TP ranks: pick a TP size dividing them")
    if num_kv_heads < tp and tp % num_kv_heads:
        raise ValueError(f"{tp} TP ranks cannot share {num_kv_heads} KV heads evenly: use a multiple of {num_kv_heads}")


def query_heads(tp_rank: int, tp: int, num_heads: int) -> range:
    """The query heads TP rank ``tp_rank`` of ``tp`` holds."""
    per = num_heads // tp
    return range(tp_rank * per, (tp_rank + 1) * per)


def kv_heads(tp_rank: int, tp: int, num_kv_heads: int) -> range:
    """The KV heads TP rank ``tp_rank`` of ``tp`` holds (one replicated head when there are fewer than ``tp``)."""
    if num_kv_heads >= tp:
        per = num_kv_heads // tp
        return range(tp_rank * per, (tp_rank + 1) * per)
    head = tp_rank * num_kv_heads // tp
    return range(head, head + 1)
