"""Tensor parallelism over real gloo process groups: the sharded model gives the single-process
engine's (and transformers') greedy tokens; TP x CP prefill and TP x KVP decode equal one process
at the tensor level; each rank reads and holds only its shard of the weights."""

import ctypes
import json

import pytest
import torch
from multiproc import run_ranks, values
from safetensors.torch import save_file
from test_cp_model import single_process_kv
from test_model import ours_from, run_chunks, tiny_hf
from transformers import LlamaForCausalLM

from ringserve.decode_service.kvp import KVPRank, StepEntry
from ringserve.engine.config import ModelConfig
from ringserve.engine.engine import Engine, Sequence
from ringserve.engine.kv_cache import KVCache
from ringserve.engine.model import Llama
from ringserve.engine.tp import apply_tp, kv_heads, load_tp_model, param_shard, random_shard
from ringserve.engine.weights import gguf_cache_dir
from ringserve.mesh import Layout, init_mesh
from ringserve.prefill_service.context_parallel import CPRunner, CPSequence
from ringserve.prefill_service.sharding import plan_pass

BLOCK = 8


def greedy(model: Llama, prompt: list[int], n: int, chunk: int | None) -> list[int]:
    """The engine's own prefill (in chunks of ``chunk``) and decode steps, greedy, no tokenizer."""
    engine = Engine(model, tokenizer=None, num_blocks=64, block_size=BLOCK, prefill_chunk=chunk)
    seq = Sequence(list(prompt), [])
    logits, out = engine.prefill(seq), []
    for _ in range(n):
        out.append(int(logits.argmax()))
        seq.token_ids.append(out[-1])
        logits = engine.forward(seq, 1, want_logits=True)
    engine.cache.allocator.free(seq.block_table)
    assert engine.cache.allocator.num_used == 0
    return out


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rss() -> int:
    """This process's resident memory in bytes (anonymous and file-backed: a TP 1 load maps the
    checkpoint, whose pages become resident as the model reads them), after glibc has returned
    the heap memory it keeps from freed buffers (which varies from run to run)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def tp_greedy(rank, world, path, prompt, n, chunks):
    """Greedy tokens for each prefill chunk size; parameter bytes; resident memory grown by the
    load, once every weight has been read."""
    before = rss()
    model = load_tp_model(path, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # reads every page
    resident = rss() - before
    return [greedy(model, prompt, n, c) for c in chunks], param_bytes(model), resident


def save_sharded(directory, config: ModelConfig, state: dict[str, torch.Tensor], files: int = 2) -> None:
    """An HF checkpoint in several safetensors files with an index (as large models ship)."""
    names = sorted(state)
    weight_map = {}
    for i in range(files):
        file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[i::files]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config.to_hf()))


def hf_greedy(hf: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "tp,heads,kv,tied",
    [
        pytest.param(2, 4, 2, False, id="tp2-gqa-untied"),
        pytest.param(4, 8, 2, True, id="tp4-replicated-kv-tied"),
    ],
)
def test_tp_greedy_equals_engine_and_transformers(tp, heads, kv, tied, tmp_path):
    """Odd vocabulary (97: the last rank's rows are padded), sharded checkpoint files, full and
    chunked prefill, 30 decode steps."""
    hf = tiny_hf(heads, kv, tied, seed=tp)
    ours = ours_from(hf)
    save_sharded(tmp_path, ours.config, dict(ours.state_dict()), files=3)
    prompt = [5, 17, 42, 3, 88, 11, 60, 1, 96, 23, 7, 50, 2]
    ref = hf_greedy(hf, prompt, 30)
    assert greedy(ours, prompt, 30, None) == ref
    results = values(run_ranks(tp, tp_greedy, str(tmp_path), prompt, 30, [None, 5]))
    for tokens, nbytes, _ in results:
        assert tokens == [ref, ref]
        assert nbytes < param_bytes(ours) / tp * 1.1  # norms are replicated, the vocabulary padded


def test_tp2_rank_holds_half_the_weights(tmp_path):
    """Counted parameter bytes: exactly half of every split tensor plus the replicated norms; and
    the process's resident memory after loading (measured) is about half of a TP 1 load's."""
    config = ModelConfig(
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    )
    full = Llama.random(config, torch.float32, seed=1)
    save_sharded(tmp_path, config, dict(full.state_dict()))
    norms = sum(p.numel() * 4 for name, p in full.named_parameters() if param_shard(name, config, 0, 2) is None)
    prompt = [1, 2, 3, 4]
    [(ref, one_bytes, one_rss)] = values(run_ranks(1, tp_greedy, str(tmp_path), prompt, 3, [None]))
    assert one_bytes == param_bytes(full)
    for tokens, nbytes, resident in values(run_ranks(2, tp_greedy, str(tmp_path), prompt, 3, [None])):
        assert tokens == ref
        assert nbytes == (one_bytes - norms) // 2 + norms
        assert resident < 0.75 * one_rss, (resident, one_rss)  # ~0.5 and some MB of buffers


def test_tp3_default_model(default_model, default_gguf):
    """SmolLM2-135M (9 heads, 3 KV heads: TP 3 is the size that splits it) from its GGUF's
    converted copy: the engine's greedy tokens, which transformers gives on the same weights."""
    model, tokenizer = default_model
    prompt = tokenizer.encode("The capital of France is")
    ref = greedy(model, prompt, 8, None)
    hf = LlamaForCausalLM.from_pretrained(gguf_cache_dir(default_gguf), dtype=torch.float32).eval()
    assert hf_greedy(hf, prompt, 8) == ref
    assert tokenizer.decode(ref).startswith(" Paris.")
    for tokens, nbytes, _ in values(run_ranks(3, tp_greedy, None, prompt, 8, [None, 4])):
        assert tokens == [ref, ref]
        assert nbytes < param_bytes(model) / 3 * 1.01


def apply_tp_in_place(rank, world, config_dict, state, prompt):
    model = Llama.from_state_dict(ModelConfig.from_hf(config_dict), state)
    return greedy(apply_tp(model), prompt, 10, 3)


def test_apply_tp_shards_a_loaded_model():
    """``apply_tp`` on a model that already holds all its weights (the same result as loading shards)."""
    hf = tiny_hf(4, 2, True, seed=7)
    ours = ours_from(hf)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = greedy(ours, prompt, 10, None)
    for tokens in values(run_ranks(2, apply_tp_in_place, hf.config.to_dict(), dict(ours.state_dict()), prompt)):
        assert tokens == ref


def dummy_greedy(rank, world, path, prompt, n):
    model = load_tp_model(path, progress=False, load_format="dummy")
    return greedy(model, prompt, n, 4), run_chunks(model, prompt, [len(prompt)]), param_bytes(model)


def test_dummy_weights_under_tp_are_each_ranks_own_part_of_one_model(tmp_path):
    """``--load-format dummy`` at TP 4 over 2 KV heads and an odd vocabulary: each rank makes only its
    part (a quarter of the bytes); put together (replicated heads agree), the parts are one model
    whose single-process greedy tokens the group gives."""
    config = ModelConfig.from_hf(tiny_hf(8, 2, False).config.to_dict())
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).state_dict().items()}
    full = {}
    for name, shape in shapes.items():
        full[name] = torch.full(shape, float("nan"))
        for t in range(4):
            shard = param_shard(name, config, t, 4)
            part = random_shard(name, shape, shard, torch.float32, "cpu")
            if shard is None:
                full[name] = part
                continue
            rows = part.narrow(shard.dim, 0, shard.end - shard.start)  # not the padding
            target = full[name].narrow(shard.dim, shard.start, shard.end - shard.start)
            assert torch.isnan(target).all() or torch.equal(target, rows), f"{name}: replicas differ"
            target.copy_(rows)
    model = Llama.from_state_dict(config, full)
    prompt = [5, 17, 42, 3, 88, 11, 60, 1, 96]
    ref, ref_logits = greedy(model, prompt, 12, None), run_chunks(model, prompt, [len(prompt)])
    for tokens, logits, nbytes in values(run_ranks(4, dummy_greedy, str(tmp_path), prompt, 12)):
        assert tokens == ref
        torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-5)  # every position, every logit
        assert nbytes < param_bytes(model) / 4 * 1.1


# --- TP x CP prefill, TP x KVP decode ------------------------------------------------------------


def tp_cp_passes(rank, world, layout, path, token_ids, passes, strategies):
    """Prefill in passes on a TP x CP mesh; return the leader's logits and this rank's KV."""
    mesh = init_mesh(layout)
    model = load_tp_model(path, mesh.tp_group, progress=False)
    cache = KVCache(model.config, num_blocks=64, block_size=BLOCK)
    runner = CPRunner(model, cache, group=mesh.outer_group)
    seq, logits, positions, start = CPSequence(), [], [], 0
    for n, strategy in zip(passes, strategies):
        out = runner.prefill([seq], [token_ids[start : start + n]], strategy)
        logits.append(out[0] if out else None)
        positions += [start + i for i in plan_pass(n, layout.outer, BLOCK).rank_tokens(mesh.outer_rank)]
        start += n
    layers = range(model.config.num_hidden_layers)
    kv = torch.stack([torch.stack(cache.read(layer, seq.block_table, seq.num_cached_local)) for layer in layers])
    cache.allocator.free(seq.block_table)
    return mesh.tp_rank, mesh.outer_rank, logits, positions, kv, cache.allocator.num_used


@pytest.mark.parametrize("tp,cp,heads,kv", [(2, 2, 4, 2), (4, 1, 8, 2)], ids=["tp2xcp2", "tp4-replicated"])
def test_tp_cp_prefill_equals_single_process(tp, cp, heads, kv, tmp_path):
    """A full prefill, then partial prefills over the cached KV (pass-KV and pass-Q): the leader's
    logits and every rank's KV (its tokens, its heads) equal one process's."""
    hf = tiny_hf(heads, kv, False, seed=tp + cp)
    ours = ours_from(hf)
    save_sharded(tmp_path, ours.config, dict(ours.state_dict()))
    ids = torch.randint(0, 97, (90,), generator=torch.Generator().manual_seed(cp)).tolist()
    passes, strategies = [37, 1, 52], ["pass_kv", "pass_q", "auto"]
    results = values(run_ranks(tp * cp, tp_cp_passes, Layout(tp, cp), str(tmp_path), ids, passes, strategies))
    ref_logits, ref_kv = run_chunks(ours, ids, passes, block_size=BLOCK), single_process_kv(ours, ids)
    ends = [sum(passes[: i + 1]) - 1 for i in range(len(passes))]
    seen = set()
    for tp_rank, cp_rank, logits, positions, kv_, used in results:
        if cp_rank == 0:
            for got, end in zip(logits, ends):
                torch.testing.assert_close(got, ref_logits[end], atol=1e-4, rtol=1e-4)
        else:
            assert logits == [None] * len(passes)
        heads_ = kv_heads(tp_rank, tp, kv)
        torch.testing.assert_close(kv_, ref_kv[:, :, positions, heads_.start : heads_.stop], atol=1e-4, rtol=1e-4)
        assert used == 0, "blocks leaked"
        seen |= {(p, h) for p in positions for h in heads_}
    assert seen == {(p, h) for p in range(len(ids)) for h in range(kv)}


def tp_kvp_steps(rank, world, layout, path, prompt_kv, split, tokens):
    """Hold rows [0, split) of the prompt's KV on KVP rank 0 and the rest on KVP rank 1 (this TP
    rank's heads), then decode ``tokens`` one step each; KVP rank 0 returns the logits."""
    mesh = init_mesh(layout)
    model = load_tp_model(path, mesh.tp_group, progress=False)
    cache = KVCache(model.config, num_blocks=64, block_size=BLOCK)
    kvp = KVPRank(model, cache, mesh.outer_rank, layout.outer, use_graphs=False, group=mesh.outer_group)
    heads = kv_heads(mesh.tp_rank, layout.tp, prompt_kv.shape[3])
    rows = range(split) if mesh.outer_rank == 0 else range(split, prompt_kv.shape[2])
    table = cache.allocator.allocate(8)
    kvp.reserve("r", 1, table, rows.start, len(rows))
    slots = cache.slots(table, 0, len(rows))
    for layer, (k, v) in enumerate(prompt_kv[:, :, rows.start : rows.stop, heads.start : heads.stop]):
        cache.write(layer, slots, k, v)
    n = prompt_kv.shape[2]
    logits = [kvp.step([StepEntry("r", t, n + i, owner=i % 2)], group_wide=True) for i, t in enumerate(tokens)]
    cache.allocator.free(table)
    return mesh.outer_rank, logits, cache.allocator.num_used


def test_tp2_kvp2_decode_step_equals_single_process(tmp_path):
    hf = tiny_hf(4, 2, False, seed=11)
    ours = ours_from(hf)
    save_sharded(tmp_path, ours.config, dict(ours.state_dict()))
    ids = torch.randint(0, 97, (45,), generator=torch.Generator().manual_seed(5)).tolist()
    tokens = [7, 70, 3, 33, 91, 12]
    ref = run_chunks(ours, ids + tokens, [len(ids)] + [1] * len(tokens), block_size=BLOCK)[len(ids) :]
    prompt_kv = single_process_kv(ours, ids)
    results = values(run_ranks(4, tp_kvp_steps, Layout(2, 2), str(tmp_path), prompt_kv, 19, tokens))
    for kvp_rank, logits, used in results:
        assert used == 0
        if kvp_rank == 0:
            torch.testing.assert_close(torch.cat(logits), ref, atol=1e-4, rtol=1e-4)
        else:
            assert logits == [None] * len(tokens)
