"""load_weights: Hugging Face directories and GGUF files give the same Hugging Face state dict."""

import logging
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from ringserve.engine.config import ModelConfig
from ringserve.engine.tp import param_shard, take_shard
from ringserve.engine.weights import gguf_cache_dir, load_weights, save_hf_checkpoint
from ringserve.errors import FailedPrecondition, InvalidArgument, NotFound


def tiny_hf(tied: bool, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def expected_state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's parameters as load_weights should return them (no lm_head when tied)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


# -- Hugging Face checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_directory(tmp_path, tied):
    model = tiny_hf(tied)
    model.save_pretrained(tmp_path)
    config, state = load_weights(tmp_path, progress=False)
    assert config.num_hidden_layers == 2 and config.num_key_value_heads == 2 and config.head_dim == 8
    assert config.tie_word_embeddings is tied
    assert ("lm_head.weight" in state) is not tied
    assert_same_state(state, expected_state(model))


def test_hf_sharded(tmp_path):
    model = tiny_hf(tied=False)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    _, state = load_weights(str(tmp_path), progress=False)
    assert_same_state(state, expected_state(model))


def assert_shards(path, tp: int) -> None:
    """Each TP rank's load is exactly its shard (``param_shard``) of the full load, and the ranks'
    shards together are the whole model (vocabulary padding aside)."""
    config, full = load_weights(path, progress=False)
    rows = {}
    for rank in range(tp):
        same, state = load_weights(path, progress=False, tp_rank=rank, tp=tp)
        assert same == config and sorted(state) == sorted(full)
        for name, tensor in state.items():
            assert torch.equal(tensor, take_shard(full[name], param_shard(name, config, rank, tp))), name
        rows[rank] = state["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(torch.cat(list(rows.values())), full["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("tp", [2, 4])
def test_hf_sharded_files_load_per_tp_rank(tmp_path, tp):
    tiny_hf(tied=False, vocab_size=63).save_pretrained(tmp_path, max_shard_size="20KB")  # 63: padded rows
    assert_shards(tmp_path, tp)


def test_gguf_loads_per_tp_rank_on_a_cache_miss_and_hit(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_hf(tied=True))
    _, first = load_weights(path, progress=False, tp_rank=1, tp=2)  # converts (miss), then shards
    assert (gguf_cache_dir(path) / "model.safetensors").is_file()
    assert_shards(path, 2)  # from the converted copy
    _, again = load_weights(path, progress=False, tp_rank=1, tp=2)
    assert_same_state(again, first)


@pytest.mark.parametrize(
    "tp,heads,kv,ff,match",
    [
        (2, 3, 3, 48, "3 attention heads do not split across 2"),
        (4, 4, 2, 48, None),  # fine: 2 KV heads replicated over 4 ranks
        (3, 6, 2, 48, "3 TP ranks cannot share 2 KV heads"),
        (4, 4, 4, 50, "MLP width 50 does not split across 4"),
    ],
)
def test_tp_size_that_cannot_shard_the_model(tmp_path, tp, heads, kv, ff, match):
    tiny_hf(
        tied=True, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ff, hidden_size=24
    ).save_pretrained(tmp_path)
    if match is None:
        load_weights(tmp_path, progress=False, tp_rank=tp - 1, tp=tp)
        return
    with pytest.raises(FailedPrecondition, match=f"--tp {tp} cannot shard this model: .*{match}"):
        load_weights(tmp_path, progress=False, tp_rank=0, tp=tp)


def test_tp_rank_outside_the_group(tmp_path):
    tiny_hf(tied=True).save_pretrained(tmp_path)
    with pytest.raises(InvalidArgument, match="outside a TP group of 2"):
        load_weights(tmp_path, progress=False, tp_rank=2, tp=2)


def test_single_safetensors_file_and_dtype(tmp_path):
    model = tiny_hf(tied=True)
    model.save_pretrained(tmp_path)
    _, state = load_weights(tmp_path / "model.safetensors", dtype=torch.bfloat16, progress=False)
    want = {k: v.to(torch.bfloat16) for k, v in expected_state(model).items()}
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert_same_state(state, want)


def test_save_hf_checkpoint_round_trip(tmp_path):
    model = tiny_hf(tied=False)
    config = ModelConfig.from_hf(model.config.to_dict())
    save_hf_checkpoint(tmp_path, config, expected_state(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    got_config, state = load_weights(tmp_path, progress=False)
    assert got_config == config
    assert_same_state(state, expected_state(model))
    # And transformers reads what we wrote.
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert_same_state(expected_state(again), expected_state(model))


# -- GGUF ------------------------------------------------------------------------------------------


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, arch: str = "llama", drop: tuple[str, ...] = ()) -> None:
    """Write ``model`` as an F32 GGUF the way llama.cpp's converter does (names, q/k permutation)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, tensor in expected_state(model).items():
        w = tensor.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            part = rest.removesuffix(".weight")
            heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}
            if part in heads:  # llama.cpp's convert_hf_to_gguf permutation
                n = heads[part]
                w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
            gguf_name = f"blk.{layer}.{names[part]}.weight"
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        if gguf_name not in drop:
            writer.add_tensor(gguf_name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiny_gguf_round_trip_and_cache(tmp_path, tied):
    model = tiny_hf(tied)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, model)
    config, state = load_weights(path, progress=False)
    assert config.tie_word_embeddings is tied and config.vocab_size == 64 and config.rms_norm_eps == 1e-6
    assert_same_state(state, expected_state(model))  # F32: exact, so the un-permutation is exact too
    cache = gguf_cache_dir(path)
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    _, again = load_weights(path, dtype=torch.float16, progress=False)
    assert_same_state(again, {k: v.half() for k, v in expected_state(model).items()})


def test_tiny_gguf_corrupt_cache_is_rebuilt(tmp_path, caplog):
    model = tiny_hf(tied=True)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, model)
    load_weights(path, progress=False)
    cached = gguf_cache_dir(path) / "model.safetensors"
    cached.write_bytes(cached.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="ringserve.engine.weights"):
        _, state = load_weights(path, progress=False)
    assert "converting again" in caplog.text
    assert_same_state(state, expected_state(model))
    assert len(load_file(cached)) == len(state)


def test_gguf_missing_layer_tensor(tmp_path):
    path = tmp_path / "broken.gguf"
    write_tiny_gguf(path, tiny_hf(tied=True), drop=("blk.1.attn_q.weight",))
    with pytest.raises(FailedPrecondition, match=r"missing 1 tensor.*model\.layers\.1\.self_attn\.q_proj\.weight") as e:
        load_weights(path, progress=False)
    assert "broken.gguf" in str(e.value)


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, tiny_hf(tied=True), arch="gpt2")
    with pytest.raises(FailedPrecondition, match=r"architecture 'gpt2'.*'llama'"):
        load_weights(path, progress=False)


@pytest.fixture(scope="module")
def default_weights(default_gguf):
    """(config, state, seconds) of the first load of the default GGUF in this session."""
    start = time.perf_counter()
    config, state = load_weights(None, progress=False)
    return config, state, time.perf_counter() - start


@pytest.fixture(scope="module")
def transformers_gguf_model(default_gguf):
    """transformers' own dequantization of the default GGUF (slow: load once)."""
    return LlamaForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


def test_default_gguf_config(default_weights):
    config, state, _ = default_weights
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 100000.0
    assert "lm_head.weight" not in state
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(t.dtype == torch.float32 for t in state.values())


def test_default_gguf_matches_transformers(default_weights, transformers_gguf_model):
    _, state, _ = default_weights
    theirs = transformers_gguf_model.state_dict()
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.17.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ]:
        torch.testing.assert_close(state[name], theirs[name].float(), rtol=0, atol=1e-6, msg=name)


def test_default_gguf_second_load_is_cached_and_fast(default_weights, default_gguf):
    config, state, _ = default_weights
    assert (gguf_cache_dir(default_gguf) / "model.safetensors").is_file()
    start = time.perf_counter()
    config2, state2 = load_weights(default_gguf, progress=False)
    assert time.perf_counter() - start < 2.0
    assert config2 == config
    assert_same_state(state2, state)
    _, half = load_weights(default_gguf, dtype=torch.bfloat16, progress=False)
    name = "model.layers.5.mlp.up_proj.weight"
    assert half[name].dtype == torch.bfloat16
    torch.testing.assert_close(half[name].float(), state[name], rtol=1e-2, atol=1e-3)


def test_progress_bar_on_stderr(tmp_path, capsys):
    tiny_hf(tied=True).save_pretrained(tmp_path)
    load_weights(tmp_path, progress=True)
    assert "loading" in capsys.readouterr().err
    load_weights(tmp_path, progress=False)
    assert capsys.readouterr().err == ""


# -- errors ----------------------------------------------------------------------------------------


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(NotFound, match="does not exist") as e:
        load_weights(missing)
    assert str(missing) in str(e.value) and ".gguf" in str(e.value) and "config.json" in str(e.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FailedPrecondition, match="no config.json") as e:
        load_weights(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_directory_without_weights(tmp_path):
    tiny_hf(tied=True).config.save_pretrained(tmp_path)
    with pytest.raises(FailedPrecondition, match="no .*safetensors"):
        load_weights(tmp_path)


def test_bad_config_json(tmp_path):
    tiny_hf(tied=True).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FailedPrecondition, match="config.json"):
        load_weights(tmp_path)


def test_truncated_gguf(tmp_path, default_gguf):
    half = tmp_path / "half.gguf"
    with open(default_gguf, "rb") as src, open(half, "wb") as dst:
        dst.write(src.read(default_gguf.stat().st_size // 2))
    with pytest.raises(FailedPrecondition, match="truncated") as e:
        load_weights(half, progress=False)
    assert "half.gguf" in str(e.value)


def test_random_bytes_gguf(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(FailedPrecondition, match="not a GGUF") as e:
        load_weights(path, progress=False)
    assert "random.gguf" in str(e.value)


def test_truncated_safetensors(tmp_path):
    tiny_hf(tied=False).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(FailedPrecondition, match="truncated or corrupt") as e:
        load_weights(tmp_path, progress=False)
    assert str(weights) in str(e.value)


def test_missing_layer_tensor(tmp_path):
    tiny_hf(tied=False).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not k.startswith("model.layers.1.")}, weights, {"format": "pt"})
    with pytest.raises(FailedPrecondition, match=r"missing 9 tensor\(s\).*model\.layers\.1\.input_layernorm"):
        load_weights(tmp_path, progress=False)


def test_missing_shard(tmp_path):
    tiny_hf(tied=False).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FailedPrecondition, match=shard.name):
        load_weights(tmp_path, progress=False)


def test_wrong_shape(tmp_path):
    tiny_hf(tied=False).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"] = torch.ones(31)
    save_file(state, weights, {"format": "pt"})
    with pytest.raises(FailedPrecondition, match=r"model\.norm\.weight has shape \(31,\)"):
        load_weights(tmp_path, progress=False)


def test_biases_rejected(tmp_path):
    tiny_hf(tied=True, attention_bias=True).save_pretrained(tmp_path)
    with pytest.raises(FailedPrecondition, match="bias"):
        load_weights(tmp_path, progress=False)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"x")
    with pytest.raises(FailedPrecondition, match="pytorch_model.bin"):
        load_weights(path)
