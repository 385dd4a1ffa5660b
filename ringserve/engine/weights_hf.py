"""Hugging Face checkpoints: config.json plus safetensors (one file or sharded with an index).

Reading goes through safetensors' slices, so a TP rank reads only its part of each tensor
(``engine.tp.param_shard``) and never holds the whole model. Writing (``save_hf_checkpoint``) is
how a converted GGUF is cached.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from ringserve.engine.config import ModelConfig
from ringserve.engine.tp import check_model_tp, param_shard, take_shard
from ringserve.errors import FailedPrecondition

PATH_HINT = "pass a Hugging Face directory (config.json + *.safetensors) or a .gguf file"


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


def save_hf_checkpoint(directory: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {name: t.detach().contiguous() for name, t in state_dict.items()}
    atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
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


def read_hf_config(directory: Path) -> ModelConfig:
    """The ``ModelConfig`` from ``directory/config.json``."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        hint = f" (to load a GGUF, pass the file itself, e.g. {ggufs[0]})" if ggufs else ""
        raise FailedPrecondition(f"{directory} has no config.json; {PATH_HINT}{hint}")
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


def safetensors_files(directory: Path) -> list[Path]:
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
            raise FailedPrecondition(f"{index} lists shards that are not in {directory}: {', '.join(missing)}")
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


def load_hf(
    directory: Path, only_file: Path | None, dtype: torch.dtype, progress: bool, tp_rank: int = 0, tp: int = 1
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a Hugging Face checkpoint (all its safetensors files, or just ``only_file``): TP rank
    ``tp_rank``'s shard of each tensor (all of it when ``tp`` is 1), in ``dtype``."""
    from safetensors import safe_open

    config = read_hf_config(directory)
    if tp > 1:  # a layout that cannot shard the model fails before any weight is read
        check_model_tp(config, tp)
    shapes = expected_shapes(config)
    files = [only_file] if only_file is not None else safetensors_files(directory)
    state: dict[str, torch.Tensor] = {}
    found: dict[str, tuple[int, ...]] = {}
    with tqdm(
        total=len(shapes), desc=f"loading {directory.name}", unit="tensor", file=sys.stderr, disable=not progress
    ) as bar:
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    names = list(f.keys())
                    reject_biases(names, file)
                    for name in names:
                        if name not in shapes:  # drop the rest (rotary inv_freq, tied lm_head copies, ...)
                            continue
                        part = f.get_slice(name)
                        found[name] = tuple(part.get_shape())
                        if found[name] == shapes[name]:  # a wrong shape is reported below, unread
                            state[name] = _read(f, name, part, tp_rank, tp, config, dtype)
                        bar.update(1)
            except FailedPrecondition:
                raise
            except Exception as e:  # safetensors raises its own error types, OSError, ...
                raise FailedPrecondition(f"cannot read {file} (truncated or corrupt safetensors file?): {e}") from e
    check_shapes(found, shapes, str(only_file or directory))
    return config, state


def _read(f, name: str, part, tp_rank: int, tp: int, config: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    """One tensor (TP 1: as safetensors maps it), or TP rank ``tp_rank``'s shard, copied out of the
    memory-mapped file: a view would keep the file mapped, with every page a column slice touched
    (all of the tensor's) resident."""
    if tp == 1:
        return f.get_tensor(name).to(dtype)
    return take_shard(part, param_shard(name, config, tp_rank, tp)).to(dtype, copy=True)


def reject_biases(names: list[str], source: Path | str) -> None:
    """Llama has no biases; silently dropping them would give a wrong model, so refuse."""
    biases = [n for n in names if n.endswith(".bias")]
    if biases:
        raise FailedPrecondition(
            f"{source} has bias tensors (e.g. {biases[0]}); ringserve runs Llama models, which have none"
        )


def check_shapes(found: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Every expected tensor must be present (``found``: name -> its full shape) with the shape the
    config implies."""
    missing = [n for n in shapes if n not in found]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FailedPrecondition(
            f"{source} is missing {len(missing)} tensor(s) the config needs: {shown}; "
            "the checkpoint is incomplete or does not match its config"
        )
    for name, shape in shapes.items():
        if tuple(found[name]) != shape:
            raise FailedPrecondition(
                f"{source}: tensor {name} has shape {tuple(found[name])} but the config implies {shape}"
            )
