"""What both kinds of groups (CP prefill, KVP decode) share: forming the torch.distributed group and
checking that every rank runs the same model. How the leader starts and talks to its ranks is
``rank_link.py``."""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import TYPE_CHECKING

from ringserve.errors import FailedPrecondition, Unavailable

if TYPE_CHECKING:  # torch loads inside the functions: `ringserve --help` and launch.py stay light
    import torch
    import torch.distributed as dist

    from ringserve.engine.model import Llama
    from ringserve.mesh import Layout, Mesh


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (for a rendezvous)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, init_method: str, device: torch.device, timeout_s: float = 60.0) -> None:
    """Join the group's process group (NCCL on GPU, gloo on CPU); a rank that never joins makes
    every other rank fail after ``timeout_s`` instead of hanging."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # collectives on objects (all_gather_object) use the current device
        import torch

        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    except (RuntimeError, dist.DistStoreError) as e:
        raise Unavailable(
            f"rank {rank} could not form a group of {world} at {init_method} within {timeout_s:.0f} s: "
            f"is every rank started with the same world size and address? ({e})"
        ) from e


def check_group(model: Llama, world: int, dtype: torch.dtype, group: dist.ProcessGroup | None = None) -> None:
    """Every rank must run the same model shape and dtype in a group of the expected size."""
    import torch.distributed as dist

    actual = dist.get_world_size(group)
    if actual != world:
        raise FailedPrecondition(f"the group has {actual} ranks but {world} were configured")
    c = model.config
    mine = (
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        str(dtype),
    )
    everyone: list = [None] * actual
    dist.all_gather_object(everyone, mine, group=group)
    for r, theirs in enumerate(everyone):
        if theirs != mine:
            raise FailedPrecondition(
                "ranks disagree on (layers, heads, kv heads, head dim, vocab, dtype): "
                f"rank {dist.get_rank(group)} has {mine}, rank {r} has {theirs}; "
                "load the same model and dtype everywhere"
            )


def join_and_load_tp(
    cfg, layout: Layout, rank: int, init_method: str, device: torch.device, dtype: torch.dtype
) -> tuple[Llama, Mesh]:
    """A rank of a TP > 1 group (``cfg``: a prefill or decode config): join the group first (world
    rank ``rank`` of ``layout``), then read only this rank's shard of the checkpoint
    (``engine.tp.load_tp_model``, which checks the model splits over ``layout.tp`` before reading
    any weight; ``--load-format dummy``: makes only its shard's random weights). TP 1 loads the
    whole model before joining, as it always has."""
    from ringserve.engine.tp import load_tp_model
    from ringserve.mesh import init_mesh

    init_group(rank, layout.world, init_method, device, cfg.group_timeout_s)
    mesh = init_mesh(layout)
    model = load_tp_model(cfg.model, mesh.tp_group, dtype, device, progress=rank == 0, load_format=cfg.load_format)
    return model, mesh
