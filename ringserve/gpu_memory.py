"""Defaults that depend on the machine: ``--device auto``, ``--dtype auto``, and a KV pool sized from
the GPU's memory (``--kv-blocks 0`` with ``--gpu-memory-fraction``, like vLLM's
``--gpu-memory-utilization``).

A service may use ``fraction`` of its GPU's total memory: its weights, its working memory (the
activations of its largest forward, cuBLAS/cuDNN workspaces, the CUDA context) and the KV pool,
which gets the rest. The share is of the total, not of what is free, so two services sharing a GPU
(``ringserve up`` runs both tiers on it) each get the same pool whatever order they start in; what
is free is checked only to say early, clearly, when the share does not fit next to what already
runs there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ringserve.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

GIB = 1 << 30
# CUDA context, cuBLAS / cuDNN workspaces and the caching allocator's slack, beyond activations.
BASE_RESERVE_BYTES = 2 * GIB
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def resolve_device(name: str) -> str:
    """``auto`` is ``cuda`` when a CUDA GPU is visible, else ``cpu``; any other name as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str) -> str:
    """``auto`` is bfloat16 on a GPU (half the bytes of every weight and KV row, and the fast
    kernels), float32 on CPU (exact tokens); any other name as given."""
    if name != "auto":
        return name
    return "bfloat16" if device.startswith("cuda") else "float32"


@dataclass(frozen=True)
class PoolRequest:
    """What one service needs to size its KV pool: the model's and the pool's byte sizes."""

    weight_bytes: int  # the model's parameters on this device
    working_bytes: int  # activations of the largest forward this service runs (see working_bytes)
    block_bytes: int  # one KV block, K and V, every layer
    min_blocks: int  # the smallest pool the service can work with


def kv_pool_blocks(req: PoolRequest, total_bytes: int, free_bytes: int, fraction: float, what: str) -> int:
    """KV blocks for ``req`` on a GPU of ``total_bytes`` with ``free_bytes`` free now, using at most
    ``fraction`` of the total; a clear error when the model and the minimum pool do not fit."""
    if not 0 < fraction <= 1:
        raise InvalidArgument(f"--gpu-memory-fraction must be in (0, 1], got {fraction}")
    budget = int(fraction * total_bytes)
    fixed = req.weight_bytes + req.working_bytes + BASE_RESERVE_BYTES
    blocks = (budget - fixed) // req.block_bytes
    need = fixed + req.min_blocks * req.block_bytes
    if blocks < req.min_blocks:
        raise FailedPrecondition(
            f"{what}: the model ({req.weight_bytes / GIB:.1f} GiB of weights, {req.working_bytes / GIB:.1f} GiB "
            f"of working memory, {BASE_RESERVE_BYTES / GIB:.0f} GiB reserve) and the smallest KV pool "
            f"({req.min_blocks} blocks, {req.min_blocks * req.block_bytes / GIB:.1f} GiB) need {need / GIB:.1f} GiB, "
            f"more than --gpu-memory-fraction {fraction} of this GPU's {total_bytes / GIB:.1f} GiB "
            f"({budget / GIB:.1f} GiB): raise the fraction, use a smaller model or dtype, or set --kv-blocks"
        )
    if fixed + blocks * req.block_bytes > free_bytes:  # the share must fit beside what runs there now
        raise FailedPrecondition(
            f"{what}: --gpu-memory-fraction {fraction} is {budget / GIB:.1f} GiB of this GPU but only "
            f"{free_bytes / GIB:.1f} GiB is free (other processes hold the rest): lower the fraction or set --kv-blocks"
        )
    return int(blocks)


def working_bytes(config, tokens: int, element_bytes: int, logits_rows: int = 0) -> int:
    """Activations of one forward over ``tokens`` tokens, at their peak (a layer's residual, norm,
    q/k/v, attention output and the MLP's gate, up and product, with float32 upcasts counted
    twice), plus ``logits_rows`` rows of float32 logits (and their sampling copy)."""
    h, i = config.hidden_size, config.intermediate_size
    return tokens * (8 * h + 4 * i) * element_bytes + logits_rows * config.vocab_size * 4 * 2


def weight_bytes(config, element_bytes: int) -> int:
    """Bytes of every parameter of a Llama model of ``config``."""
    from ringserve.engine.weights import expected_shapes

    return sum(math.prod(s) for s in expected_shapes(config).values()) * element_bytes


def block_bytes(config, block_size: int, element_bytes: int) -> int:
    """One KV block: K and V of ``block_size`` tokens in every layer."""
    return config.num_hidden_layers * 2 * block_size * config.num_key_value_heads * config.head_dim * element_bytes


def pool_request(
    config, element_bytes: int, block_size: int, work_tokens: int, logits_rows: int, min_blocks: int, tp: int = 1
) -> PoolRequest:
    """What one TP rank of ``tp`` needs: its share of the weights (the replicated norms are a rounding
    error), a block of its KV heads (``engine.tp.kv_heads``: one when ``tp`` exceeds them), and the
    working memory of the whole hidden size (the MLP and vocabulary slices only make it smaller)."""
    local_kv = max(1, config.num_key_value_heads // tp)
    return PoolRequest(
        -(-weight_bytes(config, element_bytes) // tp),
        working_bytes(config, work_tokens, element_bytes, logits_rows),
        block_bytes(config, block_size, element_bytes) // config.num_key_value_heads * local_kv,
        min_blocks,
    )


def model_config(model: str | None):
    """The ModelConfig of ``--model`` without loading its weights where possible (a HF directory,
    or a GGUF converted before); a GGUF seen for the first time is converted here (once)."""
    from ringserve.engine.weights import gguf_cache_dir, load_weights, read_hf_config, resolve_model_path

    path = resolve_model_path(model)
    if path.is_dir():
        return read_hf_config(path)
    cached = gguf_cache_dir(path)
    if (cached / "config.json").is_file():
        return read_hf_config(cached)
    return load_weights(model, progress=False)[0]


def gpu_pool_blocks(device: str, model: str | None, dtype: str, block_size: int, fraction: float,
                    work_tokens: int, logits_rows: int, min_blocks: int, what: str, tp: int = 1) -> int:  # fmt: skip
    """``kv_pool_blocks`` for a service on ``device`` (a CUDA device) with ``--model`` in ``dtype``, one
    rank of ``tp`` (each holds its shard of the weights and its KV heads)."""
    import torch

    req = pool_request(model_config(model), ELEMENT_BYTES[dtype], block_size, work_tokens, logits_rows, min_blocks, tp)
    dev = torch.device(device)
    free, total = torch.cuda.mem_get_info(dev if dev.index is not None else torch.device("cuda", 0))
    blocks = kv_pool_blocks(req, total, free, fraction, what)
    log.info(
        "%s: KV pool of %d blocks (%.1f GiB) from --gpu-memory-fraction %.2f of %.1f GiB (weights %.1f GiB, "
        "working memory %.1f GiB + %.0f GiB reserve)",
        what, blocks, blocks * req.block_bytes / GIB, fraction, total / GIB, req.weight_bytes / GIB,
        req.working_bytes / GIB, BASE_RESERVE_BYTES / GIB,
    )  # fmt: skip
    return blocks
