"""llama.cpp GGUF files: dequantized to float32 and cached as a Hugging Face checkpoint.

Dequantizing is slow (~15-20 s for SmolLM2-135M), so the result is cached as a Hugging Face
directory under ``$RINGSERVE_CACHE_DIR`` (default ``~/.cache/ringserve``); the tokenizer module
writes its converted tokenizer into the same directory. Later loads read that directory, through
safetensors slices, so a TP rank reads only its shard. One process converts at a time (a file
lock): the ranks of a TP group start together, and the others then read the first one's copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ringserve.engine.config import ModelConfig
from ringserve.engine.tp import check_model_tp, param_shard, take_shard
from ringserve.engine.weights_hf import atomic_write, check_shapes, expected_shapes, load_hf, reject_biases
from ringserve.errors import FailedPrecondition

logger = logging.getLogger(__name__)

# Bump when the converted format changes, so stale caches are not read.
_CACHE_FORMAT_VERSION = 1

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def cache_root() -> Path:
    """Where converted checkpoints live: ``$RINGSERVE_CACHE_DIR`` or ``~/.cache/ringserve``."""
    env = os.environ.get("RINGSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ringserve"


def gguf_cache_dir(gguf_path: Path) -> Path:
    """The cache directory for a converted GGUF, keyed by its absolute path, size and mtime.

    Any change to the file (re-download, edit) gives a new key, so a stale conversion is never used.
    """
    p = gguf_path.resolve()
    st = p.stat()
    key = f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{_CACHE_FORMAT_VERSION}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return cache_root() / f"{p.stem}-{digest}"


def load_gguf_cached(
    path: Path, dtype: torch.dtype, progress: bool, tp_rank: int = 0, tp: int = 1
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a GGUF (TP rank ``tp_rank``'s shard) through its converted copy in the cache,
    converting (and caching) on a miss."""
    cache = gguf_cache_dir(path)
    loaded = _load_converted(cache, path, dtype, progress, tp_rank, tp)
    if loaded is not None:
        return loaded
    with _conversion_lock(cache):
        loaded = _load_converted(cache, path, dtype, progress, tp_rank, tp)  # another rank's, meanwhile
        if loaded is not None:
            return loaded
        try:
            convert_gguf(path, cache, progress)
        except OSError as e:
            # A read-only or full cache should not stop serving; it only costs a slow load next time.
            logger.warning("could not cache the converted %s in %s (%s); loading it in memory", path, cache, e)
            return _in_memory(path, dtype, progress, tp_rank, tp)
    return load_hf(cache, None, dtype, progress, tp_rank, tp)


def _in_memory(path: Path, dtype: torch.dtype, progress: bool, tp_rank: int, tp: int):
    """The GGUF dequantized whole (no cache to read shards from), then cut to this rank's shard."""
    config, state = load_gguf(path, progress)
    if tp == 1:
        return config, {name: t.to(dtype) for name, t in state.items()}
    check_model_tp(config, tp)
    # Copies, so that the full tensors are freed when this returns.
    shards = {n: take_shard(t, param_shard(n, config, tp_rank, tp)) for n, t in state.items()}
    return config, {n: t.to(dtype, copy=True) for n, t in shards.items()}


def _load_converted(cache: Path, path: Path, dtype, progress, tp_rank, tp):
    if not ((cache / "config.json").is_file() and (cache / "model.safetensors").is_file()):
        return None
    try:
        return load_hf(cache, None, dtype, progress, tp_rank, tp)
    except FailedPrecondition as e:
        logger.warning("ignoring unreadable converted copy of %s in %s (%s); converting again", path, cache, e)
        return None


@contextlib.contextmanager
def _conversion_lock(cache: Path):
    """Hold an exclusive lock on ``cache``'s lock file (none when the cache cannot be written)."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        f = open(cache.parent / f".{cache.name}.lock", "w")  # noqa: SIM115 (held across the yield)
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` for ``path``, with unreadable files reported as FailedPrecondition."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, IndexError, ... on truncated or foreign files
        raise FailedPrecondition(f"cannot read {path} (truncated or not a GGUF file?): {e}") from e


_REQUIRED = object()


def gguf_value(reader, key: str, default=_REQUIRED):
    """A scalar or string metadata value of a GGUF file (arrays are not needed here)."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise FailedPrecondition(f"{_reader_file(reader)}: GGUF metadata has no {key!r}")
        return default
    try:
        part = field.parts[field.data[0]]
        if field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            raise ValueError("is an array")
        if field.types[0] == gguf.GGUFValueType.FLOAT32:
            # The shortest float32 spelling: 1e-05 rather than 9.999999747378752e-06, as in config.json.
            return float(str(np.float32(part[0])))
        return part.tolist()[0]
    except Exception as e:
        raise FailedPrecondition(f"{_reader_file(reader)}: GGUF metadata {key!r} is unreadable: {e}") from e


def _reader_file(reader) -> str:
    return str(getattr(reader.data, "filename", None) or "GGUF file")


def _gguf_config(reader, path: Path, tensor_shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise FailedPrecondition(
            f"{path} is a GGUF of architecture {arch!r}; ringserve runs 'llama' architecture models"
        )
    scaling = gguf_value(reader, "llama.rope.scaling.type", None)
    if "rope_freqs.weight" in tensor_shapes or scaling not in (None, "none"):
        # Long-context rope scaling (e.g. Llama 3.1's rope_freqs) cannot be recovered faithfully from
        # a GGUF; ignoring it would silently break long prompts.
        raise FailedPrecondition(
            f"{path} uses rope scaling, which ringserve cannot read from GGUF; use the Hugging Face checkpoint instead"
        )
    if "token_embd.weight" not in tensor_shapes:
        raise FailedPrecondition(f"{path} has no token_embd.weight tensor")
    hidden = int(gguf_value(reader, "llama.embedding_length"))
    heads = int(gguf_value(reader, "llama.attention.head_count"))
    head_dim = int(gguf_value(reader, "llama.attention.key_length", hidden // heads))
    rope_dim = gguf_value(reader, "llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise FailedPrecondition(f"{path}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
    return ModelConfig(
        vocab_size=tensor_shapes["token_embd.weight"][0],
        hidden_size=hidden,
        intermediate_size=int(gguf_value(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(gguf_value(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(gguf_value(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(gguf_value(reader, "llama.context_length", 8192)),
        rms_norm_eps=float(gguf_value(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf_value(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=gguf_value(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=gguf_value(reader, "tokenizer.ggml.eos_token_id", None),
    )


def _hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors Llama does not use."""
    base, _, kind = gguf_name.rpartition(".")  # kind: "weight" or "bias"
    if base.startswith("blk."):
        parts = base.split(".", 2)
        hf = _GGUF_LAYER_NAMES.get(parts[2]) if len(parts) == 3 else None
        layer = parts[1]
        return f"model.layers.{layer}.{hf}.{kind}" if hf else None
    hf = _GGUF_GLOBAL_NAMES.get(base)
    return f"{hf}.{kind}" if hf else None


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its rope pairs adjacent dims; HF pairs halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(path: Path):
    """(reader, config, {HF name: GGUF tensor}) of a llama GGUF, checked against its config."""
    reader = open_gguf(path)
    # GGUF lists dimensions innermost first; torch wants them outermost first.
    tensor_shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    config = _gguf_config(reader, path, tensor_shapes)
    shapes = expected_shapes(config)
    by_hf = {_hf_name(t.name): t for t in reader.tensors}
    by_hf.pop(None, None)
    reject_biases(list(by_hf), path)
    wanted = {n: by_hf[n] for n in shapes if n in by_hf}
    check_shapes({n: tuple(int(x) for x in reversed(t.shape)) for n, t in wanted.items()}, shapes, str(path))
    return reader, config, wanted


def _dequantized(path: Path, name: str, t, config: ModelConfig) -> np.ndarray:
    """One GGUF tensor as float32 with its Hugging Face layout (rope permutation undone)."""
    from gguf.quants import dequantize

    shape = tuple(int(x) for x in reversed(t.shape))
    try:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    except Exception as e:
        raise FailedPrecondition(f"{path}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): {e}") from e
    if name.endswith("self_attn.q_proj.weight"):
        w = _unpermute_rope(w, config.num_attention_heads)
    elif name.endswith("self_attn.k_proj.weight"):
        w = _unpermute_rope(w, config.num_key_value_heads)
    return np.ascontiguousarray(w)


def _bar(items, path: Path, progress: bool):
    return tqdm(items, desc=f"dequantizing {path.name}", unit="tensor", file=sys.stderr, disable=not progress)


def load_gguf(path: str | Path, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dequantize a llama GGUF into ``(config, float32 state dict)`` with Hugging Face names (no cache)."""
    path = Path(path)
    _, config, tensors = _gguf_tensors(path)
    # np.array copies: the reader's arrays are read-only views of the memory-mapped file.
    state = {
        n: torch.from_numpy(np.array(_dequantized(path, n, t, config)))
        for n, t in _bar(tensors.items(), path, progress)
    }
    return config, state


def convert_gguf(path: Path, directory: Path, progress: bool = True) -> None:
    """Write ``path`` dequantized into ``directory`` as a Hugging Face checkpoint (config.json,
    model.safetensors), a tensor at a time: the header is known from the shapes, each tensor is
    written as it is dequantized, so the conversion never holds more than one."""
    _, config, tensors = _gguf_tensors(path)
    header, offset = {}, 0
    for name, t in tensors.items():
        shape = [int(x) for x in reversed(t.shape)]
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, t in _bar(tensors.items(), path, progress):
                f.write(_dequantized(path, name, t, config).tobytes())

    atomic_write(directory / "model.safetensors", write)
    text = json.dumps(config.to_hf(), indent=2) + "\n"
    atomic_write(directory / "config.json", lambda p: p.write_text(text, encoding="utf-8"))
