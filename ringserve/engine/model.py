"""A Llama-family decoder in plain PyTorch (RMSNorm, RoPE with Llama-3 scaling, GQA, SwiGLU).

One forward takes a flat batch of token ids with their true positions and an ``attention``
callable that owns the KV cache. The same code therefore runs full prefill, prefill in chunks
over cached KV, decode, and (with a ring-attention callable) context-parallel prefill: only the
callable changes. Parameter names are Hugging Face's, so checkpoints load without renaming.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ringserve.engine.config import ModelConfig
from ringserve.engine.kernels import add_rms_norm, rope, silu_mul, use_kernel
from ringserve.errors import FailedPrecondition, InvalidArgument


class AttentionFn(Protocol):
    """Attends new tokens' q over the cache plus their own k, v; stores k, v; returns [T, H, D]."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse rotary frequencies [D/2], with Llama-3 or linear scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise FailedPrecondition(f"rope scaling {kind!r} is not supported (supported: llama3, linear)")
    # Llama 3.1: low frequencies are stretched by `factor`, high ones kept, the band between
    # interpolated smoothly.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, H, D] by per-token cos/sin [T, D] (the half-split layout Hugging Face uses)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def stacked_weight(owner: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """The weights of ``owner``'s Linear submodules ``names`` stacked by rows: one GEMM for them all
    (q, k, v; gate, up) instead of one each. The first call stacks them and makes each module's
    weight a view of the stack (no second copy); weights replaced since (loading, TP sharding,
    moving) are stacked again."""
    linears = [getattr(owner, n) for n in names]
    stack, ptrs = owner.__dict__.get("_stacked", (None, None))
    if stack is None or [m.weight.data_ptr() for m in linears] != ptrs:
        with torch.inference_mode(False), torch.no_grad():
            stack = torch.cat([m.weight.detach() for m in linears])
        start = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight = nn.Parameter(stack[start : start + rows], requires_grad=False)
            start += rows
        owner.__dict__["_stacked"] = (stack, [m.weight.data_ptr() for m in linears])
    return stack


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(s), s) for s = residual + x (s = x without a residual): the residual add of
        the block before, fused with this norm on a GPU."""
        if use_kernel(x):
            return add_rms_norm(x, residual, self.weight, self.eps)
        s = x if residual is None else residual + x
        xf = s.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(s.dtype), s


class SelfAttention(nn.Module):
    STACKED = ("q_proj", "k_proj", "v_proj")  # one GEMM (``stacked_weight``)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)

    def forward(self, x, cos, sin, layer: int, attention: AttentionFn) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        qkv = F.linear(x, stacked_weight(self, self.STACKED))
        if use_kernel(qkv):
            q, k, v = rope(qkv, cos, sin, self.n_heads, self.n_kv, d)
        else:
            nq, nkv = self.n_heads * d, self.n_kv * d
            q = apply_rope(qkv[:, :nq].view(t, self.n_heads, d), cos, sin)
            k = apply_rope(qkv[:, nq : nq + nkv].view(t, self.n_kv, d), cos, sin)
            v = qkv[:, nq + nkv :].view(t, self.n_kv, d)
        return self.o_proj(attention(layer, q, k, v).reshape(t, self.n_heads * d))


class MLP(nn.Module):
    STACKED = ("gate_proj", "up_proj")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, stacked_weight(self, self.STACKED))
        if use_kernel(gate_up):
            return self.down_proj(silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, cos, sin, layer: int, attention: AttentionFn) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the block before's output, not yet added to ``residual`` (None before the first
        layer: x is then the embeddings). Returns this layer's (output, residual) the same way."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, layer, attention), residual)
        return self.mlp(h), residual


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # An explicit weight skips nn.Embedding's random init (which imports torch._dynamo: seconds).
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """The whole model. ``forward`` returns logits only for the rows in ``logits_at``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.tp = None  # engine.tp.TPInfo once apply_tp has sharded this model

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] for true token positions (computed in float32, like the reference)."""
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns logits [len(logits_at), V] (all rows when None)."""
        h, residual = self.model.embed_tokens(input_ids), None
        cos, sin = self.rope(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(h, residual, cos, sin, i, attention)
        if logits_at is not None:
            h, residual = h[logits_at], residual[logits_at]
        h, _ = self.model.norm(h, residual)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight).float()

    @classmethod
    def from_state_dict(
        cls, config: ModelConfig, state_dict: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> Llama:
        """Build without allocating twice: parameters are created on the meta device and assigned."""
        with torch.device("meta"):
            model = cls(config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        if missing or unexpected:
            raise FailedPrecondition(
                f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.inv_freq = rope_inv_freq(config)
        return model.to(device).eval().stack_weights()

    def stack_weights(self) -> Llama:
        """Stack every layer's q/k/v and gate/up weights now (``stacked_weight``: the forward
        would on its first call), so that a GPU's memory is settled (the old blocks released)
        before a KV pool is sized from what is free. Returns the model."""
        for layer in self.model.layers:
            for module in (layer.self_attn, layer.mlp):
                stacked_weight(module, module.STACKED)
        if self.model.norm.weight.device.type == "cuda":
            torch.cuda.empty_cache()
        return self

    @classmethod
    def random(
        cls, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
    ) -> Llama:
        """Random weights of ``config``'s shape (normal, std 0.02; norms 1), made on ``device``:
        the same seed gives the same model in every process of a group."""
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in cls(config).state_dict().items()}
        g = torch.Generator(device=device).manual_seed(seed)
        state = {}
        for name, shape in shapes.items():
            t = torch.empty(shape, dtype=dtype, device=device)
            state[name] = t.fill_(1.0) if "norm" in name else t.normal_(0.0, 0.02, generator=g)
        return cls.from_state_dict(config, state, device)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        progress: bool = True,
        load_format: str = "auto",
    ) -> Llama:
        """Load a Hugging Face directory or GGUF file; None means the embedded default model.

        ``load_format="dummy"`` reads only the directory's config.json and makes random weights
        (``random``): for benchmarks and sizing a deployment without the checkpoint."""
        from ringserve.engine.weights import load_weights, read_hf_config, resolve_model_path

        if load_format == "dummy":
            if path is None:
                raise InvalidArgument("--load-format dummy needs --model: a directory with the config.json to copy")
            return cls.random(read_hf_config(resolve_model_path(path)), dtype, device)
        if load_format != "auto":
            raise InvalidArgument(f"--load-format must be auto or dummy, got {load_format!r}")
        config, state_dict = load_weights(path, dtype=dtype, progress=progress)
        return cls.from_state_dict(config, state_dict, device)
