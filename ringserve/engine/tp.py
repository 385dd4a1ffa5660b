"""Tensor parallelism: which attention heads each TP rank holds.

The convention every part shares (model shards, KV caches, KV handoff): TP size ``T``, rank ``t``.
Query heads split evenly. KV heads split evenly when there are at least ``T`` of them; when there
are fewer, each rank holds one KV head and ``T / Hkv`` consecutive ranks hold the same one
(replicated), so a rank's query heads always attend to KV heads it holds.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ringserve.engine.config import ModelConfig
from ringserve.engine.model import Llama, rope_inv_freq
from ringserve.errors import FailedPrecondition, InvalidArgument, Unavailable


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


# ---------------------------------------------------------------------------------------------
# Sharding the model (gpt-fast's tp.py, torchtitan's parallelize: applied to the plain Llama)


@dataclass(frozen=True)
class Shard:
    """A parameter's part on one TP rank: indices [start, end) along ``dim``, zero-padded to ``size``
    (only the vocabulary is padded, when it does not split evenly)."""

    dim: int
    start: int
    end: int
    size: int


# Column-parallel linears (output rows split); o_proj and down_proj are row-parallel (input columns split).
_COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def vocab_rows(tp_rank: int, tp: int, vocab_size: int) -> tuple[int, int, int]:
    """(start, end, padded size) of the vocabulary rows TP rank ``tp_rank`` holds."""
    per = -(-vocab_size // tp)
    start = min(tp_rank * per, vocab_size)
    return start, min(start + per, vocab_size), per


def param_shard(name: str, config: ModelConfig, tp_rank: int, tp: int) -> Shard | None:
    """Which part of parameter ``name`` (a Hugging Face name) TP rank ``tp_rank`` holds; None when
    every rank holds all of it (norms)."""
    d = config.head_dim
    if name in _VOCAB:
        start, end, per = vocab_rows(tp_rank, tp, config.vocab_size)
        return Shard(0, start, end, per)
    module = name.removesuffix(".weight").split(".", 3)[-1]  # model.layers.N.<module>
    if module in ("self_attn.q_proj", "self_attn.o_proj"):
        heads = query_heads(tp_rank, tp, config.num_attention_heads)
        start, end = heads.start * d, heads.stop * d
    elif module in ("self_attn.k_proj", "self_attn.v_proj"):
        heads = kv_heads(tp_rank, tp, config.num_key_value_heads)
        start, end = heads.start * d, heads.stop * d
    elif module in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        per = config.intermediate_size // tp  # divides: check_model_tp
        start, end = tp_rank * per, (tp_rank + 1) * per
    else:
        return None
    return Shard(0 if module in _COLUMN else 1, start, end, end - start)


def take_shard(source, shard: Shard | None) -> torch.Tensor:
    """The shard of ``source``: a tensor, or anything sliced the same way (a safetensors slice),
    so that only the shard is read."""
    if shard is None:
        return source[:]
    part = source[shard.start : shard.end] if shard.dim == 0 else source[:, shard.start : shard.end]
    missing = shard.size - (shard.end - shard.start)
    if missing:
        part = torch.cat([part, part.new_zeros(missing, *part.shape[1:])])
    return part


def check_model_tp(config: ModelConfig, tp: int) -> None:
    """FailedPrecondition unless ``tp`` ranks can shard this model: its heads (``check_tp``) and
    its MLP width must split evenly (the vocabulary need not: the last rank's rows are padded)."""
    try:
        check_tp(config.num_attention_heads, config.num_key_value_heads, tp)
    except ValueError as e:
        raise FailedPrecondition(f"--tp {tp} cannot shard this model: {e}") from e
    if config.intermediate_size % tp:
        raise FailedPrecondition(
            f"--tp {tp} cannot shard this model: its MLP width {config.intermediate_size} does not split "
            f"across {tp} TP ranks"
        )


def local_config(config: ModelConfig, tp_rank: int, tp: int) -> ModelConfig:
    """The config of one TP rank's attention: its local query and KV head counts (a rank's KV
    cache is the ordinary KVCache built from it); everything else is the model's."""
    check_model_tp(config, tp)
    return replace(
        config,
        num_attention_heads=len(query_heads(tp_rank, tp, config.num_attention_heads)),
        num_key_value_heads=len(kv_heads(tp_rank, tp, config.num_key_value_heads)),
    )


@dataclass(frozen=True)
class TPInfo:
    """What a sharded model knows of its TP group: rank, size, group, and the full model's config."""

    rank: int
    size: int
    group: dist.ProcessGroup | None
    full_config: ModelConfig


def _all_reduce(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    try:
        dist.all_reduce(x, group=tp.group)
    except (dist.DistError, RuntimeError) as e:
        raise Unavailable(f"TP rank {tp.rank}: a peer rank failed or timed out ({e})") from e
    return x


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split across TP ranks: each rank looks up the
    ids it holds, zeros the others, and the group sums. ``weight`` is also the tied LM head's."""

    def __init__(self, weight: torch.Tensor, start: int, tp: TPInfo):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.tp = start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return _all_reduce(h.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)


def _gather_logits(model: nn.Module, inputs, logits: torch.Tensor) -> torch.Tensor:
    """Forward hook on the model: each rank computed its vocabulary slice of the logits; put them
    together (every TP rank gets all of them). The rows are the same on every TP rank (the
    sampled ones, or none), so a rank with no rows skips the collective with the rest."""
    tp: TPInfo = model.tp
    if tp.size == 1 or logits.shape[0] == 0:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp.size)]
    try:
        dist.all_gather(parts, logits.contiguous(), group=tp.group)
    except (dist.DistError, RuntimeError) as e:
        raise Unavailable(f"TP rank {tp.rank}: a peer rank failed or timed out ({e})") from e
    return torch.cat(parts, dim=-1)[:, : tp.full_config.vocab_size]


def apply_tp(model: Llama, group: dist.ProcessGroup | None = None) -> Llama:
    """Shard ``model`` in place over TP ``group`` (None: the default group) and return it.

    Column-parallel q/k/v and gate/up, row-parallel o and down with one all-reduce after each
    (one per block half), heads split by the convention above (replicated KV heads when there
    are fewer than the group's ranks), vocabulary-parallel embedding and LM head with the
    logits gathered. Works on a model on the meta device too (``load_tp_model``: shapes first,
    then the rank's own weights). ``model.config`` becomes the rank's local config."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    full = model.config
    tp = TPInfo(rank, size, group, full)
    local = local_config(full, rank, size)
    names = dict(model.named_parameters())
    for name, param in names.items():
        shard = param_shard(name, full, rank, size)
        if shard is not None and name not in _VOCAB:
            owner, attr = _owner(model, name)
            setattr(owner, attr, nn.Parameter(take_shard(param.data, shard).clone(), requires_grad=False))
    start, _, _ = vocab_rows(rank, size, full.vocab_size)
    embed = take_shard(model.model.embed_tokens.weight.data, param_shard(_VOCAB[0], full, rank, size)).clone()
    model.model.embed_tokens = VocabParallelEmbedding(embed, start, tp)
    if model.lm_head is not None:
        head = take_shard(model.lm_head.weight.data, param_shard(_VOCAB[1], full, rank, size)).clone()
        model.lm_head.weight = nn.Parameter(head, requires_grad=False)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.n_heads, attn.n_kv = local.num_attention_heads, local.num_key_value_heads
        if size > 1:
            attn.o_proj.register_forward_hook(lambda m, i, out: _all_reduce(out, tp))
            layer.mlp.down_proj.register_forward_hook(lambda m, i, out: _all_reduce(out, tp))
    model.config, model.tp = local, tp
    model.register_forward_hook(_gather_logits)
    return model


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def load_tp_model(
    path: str | Path | None,
    group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
    load_format: str = "auto",
) -> Llama:
    """This TP rank's shard of a checkpoint as a sharded Llama: only the rank's part of each
    tensor is read (``load_weights(..., tp_rank, tp)``), so no rank holds the whole model.
    ``load_format="dummy"``: random weights of ``path``'s config.json shape, each rank making only
    its part (``random_shard``), as ``Llama.load`` makes them for one process."""
    from ringserve.engine.weights import load_weights, read_hf_config, resolve_model_path

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if load_format == "dummy":
        if path is None:
            raise InvalidArgument("--load-format dummy needs --model: a directory with the config.json to copy")
        config = read_hf_config(resolve_model_path(path))
        check_model_tp(config, size)
        with torch.device("meta"):
            shapes = {name: p.shape for name, p in Llama(config).state_dict().items()}
        state = {
            name: random_shard(name, shape, param_shard(name, config, rank, size), dtype, device)
            for name, shape in shapes.items()
        }
        return sharded_from_state_dict(config, state, group, device)
    if load_format != "auto":
        raise InvalidArgument(f"--load-format must be auto or dummy, got {load_format!r}")
    config, state = load_weights(path, dtype=dtype, progress=progress, tp_rank=rank, tp=size)
    return sharded_from_state_dict(config, state, group, device)


def random_shard(
    name: str, shape: torch.Size, shard: Shard | None, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> torch.Tensor:
    """A random parameter's part (normal, std 0.02; norms 1; padded vocabulary rows 0), made on
    ``device`` from a generator seeded by the parameter's name and the part's first index: ranks
    holding the same part (replicated KV heads; the same TP rank of another group, so both tiers
    at one TP size) make the same values. Another TP size makes another model."""
    if "norm" in name:
        return torch.ones(shape, dtype=dtype, device=device)
    start, end, dim = (0, shape[0], 0) if shard is None else (shard.start, shard.end, shard.dim)
    part = torch.empty(*shape[:dim], end - start, *shape[dim + 1 :], dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}:{start}".encode()))
    part.normal_(0.0, 0.02, generator=g)
    return part if shard is None else take_shard(part, dataclasses.replace(shard, start=0, end=end - start))


def sharded_from_state_dict(
    config: ModelConfig, state: dict[str, torch.Tensor], group: dist.ProcessGroup | None, device="cpu"
) -> Llama:
    """A sharded Llama from this rank's shards (``param_shard``) of the full model ``config``."""
    with torch.device("meta"):
        model = apply_tp(Llama(config), group)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise FailedPrecondition(
            f"TP shards do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.inv_freq = rope_inv_freq(config)
    return model.to(device).eval().stack_weights()
